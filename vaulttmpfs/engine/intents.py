"""The lost-answer residual, made visible: a token create whose answer never came back.

A create is sent once (a resend could mint twice). When its answer is lost after Vault acted (a gateway's
502, a read timeout, the driver killed), Vault holds a token nobody recorded: its accessor is unknown, so
nothing can revoke it, and it lives until the token role's period (or TTL) ends. So before a create is
sent, an intent (time, pod, policies, role, and that bound) is written in the state dir: the driver killed
at any point after that leaves it. Its fsync runs while the create is out (about 1 ms of each mount saved)
and is over before the mount answers, so only a power loss during the create itself can lose it. It is
dropped once the token is recorded, revoked or queued, or once the create certainly minted nothing (4xx,
429, never sent). One left behind is such a token: `status`, `doctor` and `/metrics` count them and say
until when they may be alive; reconcile drops them once that time has passed.
"""

from __future__ import annotations

import time

from .. import log
from ..config import parse_duration
from ..errors import DriverError, VaultDenied, VaultUnavailable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the exec path
if TYPE_CHECKING:
    from typing import Any

    from .interfaces import Store, VaultClient

ROLE_CHECK_SECONDS = 3600  # how long a role's lifetime, as read, is trusted (one GET per role per hour)
DEFAULT_MAX_TTL = 768 * 3600  # Vault's default system max TTL: the bound when the role cannot be read
_lifetimes: dict[str, dict[str, Any]] = {}  # role -> {"at", "seconds", "why"}, in this process


def role_lifetime(role: dict[str, Any]) -> tuple[int, str]:
    """How long a token of this role lives when nobody renews it (nobody can: its accessor is unknown)."""
    period = int(role.get("token_period") or role.get("period") or 0)
    ttl = int(role.get("token_ttl") or 0)
    explicit = int(role.get("token_explicit_max_ttl") or role.get("explicit_max_ttl") or 0)
    seconds, why = (period, f"the role's token_period ({period}s)") if period else \
        (ttl, f"the role's token_ttl ({ttl}s)") if ttl else (DEFAULT_MAX_TTL, "Vault's default max TTL (768h)")
    if explicit and explicit < seconds:
        seconds, why = explicit, f"the role's token_explicit_max_ttl ({explicit}s)"
    return seconds, why


def lifetime(store: Store, client: VaultClient, role: str) -> tuple[int, str]:
    """The role's lifetime, read at most once an hour (kept in the state dir like the generator check)."""
    now = time.time()
    note = f"role-lifetime-{role}"
    known = _lifetimes.get(role) or store.read_note(note)
    if not known or not 0 <= now - float(known.get("at") or 0) < ROLE_CHECK_SECONDS:
        try:
            found = client.read_token_role(role)
            seconds, why = role_lifetime(found) if found else (DEFAULT_MAX_TTL, "Vault's default max TTL (768h): "
                                                                                "the role was not found")
        except VaultDenied as exc:  # an older generator policy without read on the role: bound it anyway
            seconds, why = DEFAULT_MAX_TTL, f"Vault's default max TTL (768h): the role could not be read ({exc})"
        # Vault unreachable: raised, so the mount fails before its create is sent (it would fail anyway).
        known = {"at": now, "seconds": seconds, "why": why}
        store.write_note(note, known)
    _lifetimes[role] = known
    return int(known["seconds"]), str(known["why"])


class Intent:
    """One create about to go out, noted durably first. Pushed on the mount's undo stack right after it
    is written: if the mount fails, it is dropped unless the create may have minted a token that was
    then neither recorded nor revoked."""

    def __init__(self, store: Store, request, config, client: VaultClient | None, logger):
        at = time.time()
        if request.login:
            seconds, why = DEFAULT_MAX_TTL, f"at most Vault's default max TTL: the auth/{request.login.mount} " \
                                            "role's token_period/token_ttl decide"
        else:
            seconds, why = lifetime(store, client, request.role)
        self.store, self.logger, self.minted = store, logger, False
        for earlier in store.list_intents(request.mount_dir):  # a create for this volume that lost its answer
            logger.warning("an earlier token create for this volume lost its answer: its token may be alive, "
                           "unrecorded (accessor unknown)", since=iso(float(earlier.get("at") or 0)),
                           until=iso(float(earlier.get("until") or 0)), intent=earlier.get("name"))
        # Vault may act on the create at any time until the call's deadline, not only at once.
        deadline = config.timeout * (config.max_retries + 2)
        self.value = {"at": at, "until": at + deadline + seconds, "bound": why, "pod_uid": request.pod_uid,
                      "namespace": request.pod_namespace, "pod": request.pod_name,
                      "policies": list(request.policies), "role": request.role,
                      "wrap_until": at + parse_duration(config.wrap_ttl, "VAULT_WRAP_TTL")}
        self.name, self._synced = store.add_intent(request.mount_dir, self.value)

    def durable(self) -> None:
        """Its fsync is over (it ran while the create went out); raises if it failed."""
        self._synced.wait()

    def done(self) -> None:
        """The token is recorded (durably), or certainly not minted."""
        self.store.drop_intent(self.name)

    def __call__(self, exc_type, exc, _tb) -> bool:  # an ExitStack exit callback
        if exc_type is None:
            return False
        if self.minted or _minted_nothing(exc):
            self.done()  # known: revoked or queued by the undo before this, or never made
        else:
            try:
                self.durable()  # kept: on disk before the call answers
            except OSError as error:
                self.logger.error("the intent could not be made durable", intent=self.name, error=str(error))
            self.logger.warning("a token create may have taken effect without its answer: a token vaulttmpfs "
                                "cannot revoke may be alive", until=iso(self.value["until"]),
                                bound=self.value["bound"], intent=self.name)
        return False


def _minted_nothing(exc: BaseException | None) -> bool:
    if isinstance(exc, VaultUnavailable):
        return exc.unsent
    return isinstance(exc, (VaultDenied, DriverError))  # a refusal, or a failure before anything was sent


def outstanding(store: Store, now: float | None = None) -> list[dict[str, Any]]:
    """The intents whose token may still be alive (its bound not yet passed), oldest first."""
    now = time.time() if now is None else now
    return [i for i in store.list_intents() if float(i.get("until") or 0) > now]


def prune(store: Store, now: float | None = None) -> int:
    """Drop the intents whose bound has passed (their token is gone by now); how many."""
    now = time.time() if now is None else now
    expired = [i for i in store.list_intents() if float(i.get("until") or 0) <= now]
    for intent in expired:
        store.drop_intent(intent["name"])
    if expired:
        log.get(verb="reconcile").info("unrecorded tokens' bounds passed: forgotten", count=len(expired))
    return len(expired)


def summary(store: Store, now: float | None = None) -> dict[str, Any]:
    """For status, doctor and /metrics: how many such tokens may be alive, and until when."""
    found = outstanding(store, now)
    return {"count": len(found), "until": max((float(i["until"]) for i in found), default=None),
            "intents": found}


def iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
