"""`tracker init`: a fresh config file with a new API token and webhook secret."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tracker import signing

DEFAULT_PATH = "tracker.toml"

TEMPLATE = """\
# Written by `tracker init`. config.example.toml in the tracker repository shows every key.
# Check it with: tracker check-config --config {path}

[server]
host = "127.0.0.1"
port = 8686
# Bearer token(s) apps send to /v1/* (Authorization: Bearer <token>); generated for you.
api_tokens = ["{token}"]

[database]
# A relative SQLite path is relative to this file's directory.
url = "sqlite:///tracker.db"

[upstream]
# EDIT: your relay and its key (or set TRACKER_UPSTREAM_API_KEY).
# `tracker run --simulate` uses the built-in simulated relay instead and needs neither.
base_url = "https://relay.example.com"
api_key = "sk-..."

[poll]
interval = 10

[webhooks]
# EDIT: where your app receives webhooks (a registration may also name its own webhook_url).
# `tracker run --simulate --receiver` sends them to a local receiver that prints them.
# url = "https://app.example.com/hooks/tasks"
# The Standard Webhooks secret your app verifies signatures with; generated for you.
secret = "{secret}"
events = ["task.started", "task.completed", "task.failed"]
"""


class InitError(Exception):
    """The config file cannot be written; the message names the path and why."""


def write(path: Path) -> str:
    """Write a fresh config to ``path`` (mode 0600, never over an existing file).

    Returns the generated API token, so the caller can show how to use it.
    """
    token = secrets.token_urlsafe(24)
    text = TEMPLATE.format(path=path, token=token, secret=signing.new_secret())
    try:
        # O_EXCL: an existing config (with its real keys) is never overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InitError(f"{path} already exists; pass another PATH or remove it first") from None
    except OSError as exc:
        raise InitError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    return token


def next_steps(path: Path, token: str) -> str:
    """What to do once the file is written: try it, then edit it for real use."""
    return f"""\
wrote {path} (mode 0600) with a fresh API token and webhook secret

Try it now, with the built-in simulated relay and a receiver that prints your webhooks:
  tracker run --config {path} --simulate --receiver
and in another terminal:
  curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{{"platform": "luma", "ids": ["my-first-task"]}}' http://127.0.0.1:8686/v1/tasks

For real use, edit {path}: [upstream] base_url and api_key (your relay), [webhooks] url
(your app), then: tracker check-config --config {path} && tracker run --config {path}
"""
