"""`tracker run --simulate`: the daemon against the built-in simulated relay, no account needed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

from pydantic import SecretStr

from tracker import config, demo, signing
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

#: seconds per simulated status step: a task finishes about ten seconds after it is registered
STEP = 2.0


@contextlib.contextmanager
def simulated(
    settings: config.Settings, *, receiver: bool, step: float = STEP
) -> Iterator[Callable[[config.Settings], config.Settings]]:
    """What points settings at a simulated relay (and a printing receiver) while inside.

    Yields the override itself, not overridden settings: `tracker run` applies it at start and
    again to the file each reload reads, so a reload never undoes it.
    """
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(SimulatedRelay(step=step))
        demo.say(
            f"simulated relay on {relay.base_url}: any id finishes in about {5 * step:g} s, "
            "an id containing 'fail' fails"
        )
        hook_url: str | None = None
        #: every webhook secret of this run: a reload may rotate it (and may yet be refused)
        secrets = [settings.webhooks.secret.get_secret_value()]
        if receiver:

            def verify(body: bytes, headers: Mapping[str, str]) -> None:
                for secret in secrets[:-1]:  # those a reload rotated away
                    with contextlib.suppress(signing.InvalidSignature):
                        signing.verify(secret, body, headers, now=time.time())
                        return
                signing.verify(secrets[-1], body, headers, now=time.time())

            hooks = stack.enter_context(
                WebhookReceiver(verify=verify, on_receive=demo.show_webhook)
            )
            hook_url = hooks.url
            demo.say(f"webhook receiver on {hooks.url}: prints every webhook it verifies")

        def override(current: config.Settings) -> config.Settings:
            secret = current.webhooks.secret.get_secret_value()
            if secret not in secrets:
                secrets.append(secret)
            moved = {"base_url": relay.base_url, "api_key": SecretStr(relay.api_key)}
            update: dict[str, object] = {
                "upstream": current.upstream.model_copy(update=moved),
                "upstreams": {n: u.model_copy(update=moved) for n, u in current.upstreams.items()},
            }
            if current.poll.interval > step:
                # Polled every step, so each simulated status shows up as it happens.
                update["poll"] = current.poll.model_copy(update={"interval": step})
            if hook_url is not None:
                update["webhooks"] = current.webhooks.model_copy(update={"url": hook_url})
            return current.model_copy(update=update)

        yield override
