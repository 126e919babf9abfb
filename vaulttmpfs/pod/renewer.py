"""Keep the pod's token alive (`vaulttmpfs token --renew`) until SIGTERM, as postfinance's renewer sidecar did.

Renews at a fraction of the token's TTL; a failure Vault may recover from (network, 5xx, sealed)
is retried with backoff until the token would have expired; a refusal (revoked, expired, not
renewable) ends it at once. Either way the exit is non-zero, so the kubelet restarts the sidecar
(which finds the token gone and says so) or the pod fails visibly, instead of an app holding a dead token.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Protocol

from ..config import Config
from ..errors import DriverError, VaultDenied
from ..vault.client import Vault
from .output import Held

MIN_WAIT = 0.5  # seconds: the shortest sleep between renewals or retries
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
ROTATION_POLL = 2.0  # seconds between looks at the volume for a rotated token (two small file reads)


def stop_on_signals() -> threading.Event:
    """An event SIGTERM (the kubelet stopping the container) and SIGINT set."""
    stop = threading.Event()

    def handle(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


class Watch(Protocol):
    """The volume, looked at every ROTATION_POLL seconds for a token a node-side rotation put there."""

    stranded: bool  # a rotated token could not be taken after its unwrap went out: the node revokes ours soon

    def taken(self) -> Held | None:
        """The rotated token once taken (unwrapped, the outputs switched), else None."""


def keep_alive(config: Config, held: Held, options, stop: threading.Event, logger, watch: Watch | None = None) -> int:
    """Renew until stopped; with `watch`, go on with the token a rotation put in the volume once it is taken."""
    if not held.renewable:
        logger.error("the pod's token is not renewable: nothing to keep alive", accessor=held.accessor)
        return 1
    client = Vault(config, held.token)
    # The lease known so far was counted from the token's creation (the mount), maybe long ago:
    # renew at once, and learn the real TTL from Vault's answer.
    expires = time.monotonic() + float(held.lease_duration)
    renew_at, backoff = time.monotonic(), FIRST_BACKOFF
    logger.info("renewing the pod's token", accessor=held.accessor, fraction=options.renew_fraction)
    while not stop.wait(_until(renew_at, watch is not None)):
        if watch is not None:
            new = watch.taken()
            if new is not None:
                held, client = new, Vault(config, new.token)
                expires = time.monotonic() + float(held.lease_duration)
                renew_at = time.monotonic() + _next_wait(float(held.lease_duration), options.renew_fraction)
                logger.info("switched to the rotated token", accessor=held.accessor)
                continue
            if watch.stranded and not _still_alive(client, held, logger):
                return 1
        if time.monotonic() < renew_at:
            continue
        try:
            auth = client.renew_self(what="the pod's token")
        except VaultDenied as exc:
            logger.error("the pod's token can no longer be renewed", accessor=held.accessor, error=str(exc))
            return 1
        except DriverError as exc:
            left = expires - time.monotonic()
            if left <= 0:
                logger.error("the pod's token expired before Vault could renew it", accessor=held.accessor,
                             error=str(exc))
                return 1
            wait, backoff = max(MIN_WAIT, min(backoff, left / 2)), min(backoff * 2, MAX_BACKOFF)
            renew_at = time.monotonic() + wait
            logger.warning("renewal failed; retrying", accessor=held.accessor, error=str(exc),
                           retry_in=round(wait, 2), expires_in=round(left, 2))
            continue
        ttl = float(auth.get("lease_duration") or 0)
        expires = time.monotonic() + ttl
        wait, backoff = _next_wait(ttl, options.renew_fraction), FIRST_BACKOFF
        renew_at = time.monotonic() + wait
        logger.info("renewed the pod's token", accessor=held.accessor, ttl=ttl, next_in=round(wait, 2))
    return _stopping(client, held, options, logger)


def _still_alive(client, held: Held, logger) -> bool:
    """A stranded token is looked up at each poll (a read), so its revocation ends the sidecar at once,
    not at its next renewal (half the TTL: 30 minutes with a 1h period)."""
    try:
        client.lookup_self("the pod's token")
    except VaultDenied as exc:
        logger.error("the pod's token was revoked after the rotated one could not be taken: the pod needs a new "
                     "volume (delete the pod)", accessor=held.accessor, error=str(exc))
        return False
    except DriverError:
        pass  # Vault away: the renewal's own retries decide
    return True


def _until(renew_at: float, polling: bool) -> float:
    left = max(0.0, renew_at - time.monotonic())
    return min(left, ROTATION_POLL) if polling else left


def _next_wait(ttl: float, fraction: float) -> float:
    return max(MIN_WAIT, ttl * fraction)


def _stopping(client, held: Held, options, logger) -> int:
    if not options.revoke_on_exit:
        logger.info("stopping; the token stays valid until the pod's volume is unmounted", accessor=held.accessor)
        return 0
    try:
        client.revoke_self("the pod's token")
    except DriverError as exc:
        logger.error("stopping; could not revoke the pod's token (the volume's unmount will)",
                     accessor=held.accessor, error=str(exc))
        return 1
    logger.info("stopping; revoked the pod's token", accessor=held.accessor)
    return 0
