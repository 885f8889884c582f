"""The newcomer's path through the README: `tracker init` writes the file the next command
reads, and every refusal says where the bad value came from and what to do next."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import merge, toml_text
from test_cli import _config_file, human, run  # noqa: F401 - _config_file is the config_file fixture

from tracker import config

INIT_HINT = "`tracker init"


@pytest.fixture(autouse=True)
def _no_tracker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts in an empty directory with no TRACKER_* variable set."""
    for variable in ("TRACKER_CONFIG", *config.ENV_OVERRIDES):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


# -- init writes where the next command reads -------------------------------------------------


def test_init_writes_the_file_config_names_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tracker init --config PATH` writes PATH (mode 0600), says so, and writes no
    ./tracker.toml."""
    path = tmp_path / "sub" / "sub-config.toml"
    path.parent.mkdir()

    code, text = human(monkeypatch, "init", "--config", str(path))

    assert 0 == code
    assert f"wrote {path} (mode 0600)" in text
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    assert not (tmp_path / "tracker.toml").exists()


def test_init_writes_the_file_tracker_config_names_and_the_next_command_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With TRACKER_CONFIG set, `tracker init` writes that file (its JSON names it), and
    check-config then reads it: it refuses only the relay key left to edit."""
    path = tmp_path / "env.toml"
    monkeypatch.setenv("TRACKER_CONFIG", str(path))

    code, out, _ = run(capsys, "init", "--json")
    assert (0, str(path)) == (code, json.loads(out)["path"])
    assert not (tmp_path / "tracker.toml").exists()

    code, _, err = run(capsys, "check-config")
    assert 2 == code
    assert "cannot read" not in err
    assert ["upstream.api_key"] == [line.split(":")[1].strip() for line in err.splitlines()]


def test_init_never_overwrites_the_file_config_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing file named by --config is left as it is, exit 2."""
    path = tmp_path / "mine.toml"
    path.write_text("# my real config\n")

    code, _, err = run(capsys, "init", "--config", str(path))

    assert (2, True) == (code, "already exists" in err)
    assert "# my real config\n" == path.read_text()


def test_init_with_a_path_and_another_config_writes_neither(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tracker init A --config B` is refused (exit 2) rather than writing a file the next
    command would not read."""
    code, _, err = run(capsys, "init", "a.toml", "--config", "b.toml")

    assert (2, True) == (code, "name two files" in err)
    assert [] == list(tmp_path.iterdir())


# -- the "no config" errors point to `tracker init` ------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--simulate", "--receiver"],
        ["stats"],
        ["run", "--config", "tracker.toml", "--simulate", "--receiver"],
        ["stats", "--config", "tracker.toml"],
    ],
)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_without_a_config_file_the_error_names_tracker_init(
    capsys: pytest.CaptureFixture[str], argv: list[str], json_flag: list[str]
) -> None:
    """No config named, or a named one that does not exist: exit 2, saying `tracker init`
    writes one (one JSON object with --json)."""
    code, _, err = run(capsys, *argv, *json_flag)

    assert 2 == code
    if json_flag:
        error = json.loads(err)
        assert (2, True) == (error["exit_code"], INIT_HINT in error["error"])
    else:
        assert INIT_HINT in err


def test_the_missing_file_hint_writes_that_file(capsys: pytest.CaptureFixture[str]) -> None:
    """The command the missing-file error suggests writes the file the command looked for."""
    code, _, err = run(capsys, "check-config", "--config", "my config.toml")
    assert 2 == code
    assert "`tracker init --config 'my config.toml'` writes one" in err

    assert 0 == run(capsys, "init", "--config", "my config.toml")[0]
    assert Path("my config.toml").exists()


# -- run's flags ------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [["--receiver"], ["--step", "1"]])
def test_simulator_flags_without_simulate_are_refused(
    capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    """--receiver and --step without --simulate exit 2 saying so, before the config is read."""
    code, _, err = run(capsys, "run", "--config", "x.toml", *flag)

    assert (2, f"tracker: {flag[0]} goes with --simulate\n") == (code, err)


# -- where a refused value came from ----------------------------------------------------------


def test_a_bad_secret_from_the_environment_is_said_to_come_from_it(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config names the variable a bad webhook secret came from, never the value."""
    monkeypatch.setenv("TRACKER_WEBHOOKS_SECRET", "notawhsec")

    code, _, err = run(capsys, "check-config", "--config", str(config_file))

    assert 2 == code
    assert "webhooks.secret (from TRACKER_WEBHOOKS_SECRET): must be a Standard Webhooks" in err
    assert "notawhsec" not in err


def test_a_placeholder_key_from_the_environment_is_said_to_come_from_it(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRACKER_UPSTREAM_API_KEY=sk-... is refused as a placeholder naming the variable, by
    check-config and by run."""
    monkeypatch.setenv("TRACKER_UPSTREAM_API_KEY", "sk-...")

    for command in ("check-config", "run"):
        code, _, err = run(capsys, command, "--config", str(config_file))
        assert 2 == code
        assert "upstream.api_key (from TRACKER_UPSTREAM_API_KEY): the example's placeholder" in err


# -- the README's own example values ----------------------------------------------------------


def test_a_config_with_the_readmes_example_values_is_refused(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """api_tokens = ["..."], api_key = "..." and [dashboard] token = "..." as the README
    writes them fail check-config and run, each named with how to make a real one; a named
    upstream's hint names no environment variable (none overrides it)."""
    document = merge(
        _document(config_file),
        {
            "server": {"api_tokens": ["..."]},
            "upstream": {"api_key": "..."},
            "upstreams": {"reseller": {"base_url": "https://r.example.com", "api_key": "…"}},
            "dashboard": {"token": "..."},
        },
    )
    path = tmp_path / "readme.toml"
    path.write_text(toml_text(document))

    for command in ("check-config", "run"):
        code, _, err = run(capsys, command, "--config", str(path))
        assert 2 == code
        lines = err.splitlines()
        assert [
            "server.api_tokens",
            "upstream.api_key",
            "upstreams.reseller.api_key",
            "dashboard.token",
        ] == [line.split(":")[1].strip() for line in lines]
        assert "`tracker init` writes a config" in lines[0]
        assert "or in TRACKER_UPSTREAM_API_KEY" in lines[1]
        assert "put your relay key here (`tracker run --simulate` needs none)" in lines[2]
        assert "secrets.token_urlsafe" in lines[3]


def _document(config_file: Path) -> dict[str, Any]:
    return tomllib.loads(config_file.read_text())


# -- check-config lists every problem at once -------------------------------------------------


def test_check_config_lists_a_typo_and_a_placeholder_at_once(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown key and a placeholder credential are both listed in one run, the keys'
    problems first; a key already refused for its type is not named again as a placeholder."""
    document = merge(
        _document(config_file),
        {
            "poll": {"intervall": 10},
            "server": {"api_tokens": ["...", 5]},
            "upstream": {"api_key": "sk-..."},
        },
    )
    path = tmp_path / "typo.toml"
    path.write_text(toml_text(document))

    code, _, err = run(capsys, "--json", "check-config", "--config", str(path))

    assert 2 == code
    assert ["server.api_tokens", "poll.intervall", "upstream.api_key"] == [
        p.split(":")[0] for p in json.loads(err)["problems"]
    ]
