"""`vaulttmpfs token`: unwrap the volume's token once, write it where the pod's tools read it, and
(with --renew) keep it alive. Restart-safe: a token already written for this volume is reused, never
unwrapped again (a wrapping token is single-use, and the container may restart any time).

Orchestration only: the volume's files in `source`, the outputs in `output`, Vault in `vault.client`,
the renewal loop in `renewer`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from .. import log
from ..config import Config, load
from ..errors import DriverError, VaultDenied, VaultUnavailable
from ..vault.client import Vault
from . import output, renewer, source
from .output import Held

DEFAULT_VOLUME = "/var/run/secrets/vaulttmpfs"
DEFAULT_OUT = "/var/run/vault"
# Vault's clock (the volume's creation_time) and the node's may differ: a lease the node's clock says
# has less than this left is checked with Vault before it is believed over (or alive).
LEASE_SLACK = 10.0  # seconds


@dataclass(frozen=True)
class Options:
    volume_dir: str = DEFAULT_VOLUME
    out_dir: str = DEFAULT_OUT
    renew: bool = False
    revoke_on_exit: bool = False
    renew_fraction: float = 0.5


class UnwrapSent(DriverError):
    """The unwrap went out (answered or not) and no token of it was written: its wrapping token is spent,
    or may be. This run never sends it again: a spent one can only be refused, and one that may not be
    (no answer came) is for the next run to judge, from the unanswered note."""


def run(options: Options, env: dict[str, str] | None = None) -> int:
    """The whole command; its exit code. Errors are logged (stderr), never raised."""
    env = os.environ if env is None else env
    config, problem = load(env)
    log.configure(config.replace(log_file=log.STDERR))  # a container's log is its stderr
    logger = log.get(component="vaulttmpfs-token", volume=options.volume_dir, out=options.out_dir)
    stop = renewer.stop_on_signals() if options.renew else None
    try:
        if not env.get("VAULT_ADDR"):
            raise DriverError("VAULT_ADDR is not set: give the container Vault's address (env VAULT_ADDR)")
        if problem is not None:
            raise problem
        volume = source.read(options.volume_dir, config.token_filename)
        log.secret(volume.token)
        config = _with_volume_ca(config, volume)
        held = obtain(config, volume, options.out_dir, logger)
    except DriverError as exc:
        logger.error("no token for the pod", error=str(exc))
        return 1
    if stop is None:
        return 0
    watch = Rotation(config, options, held, volume.token, logger) if volume.wrapped else None
    return renewer.keep_alive(config, held, options, stop, logger, watch=watch)


class Rotation:
    """Notices a token a node-side rotation (`vaulttmpfs rotate`) put in the volume, and takes it.

    The node writes the new wrapping token, then the metadata naming it; a look between the two
    renames sees one new file and one old: source.read refuses a pair whose metadata names another
    wrapping token (the next look, ROTATION_POLL later, sees both new), and only a volume whose accessor
    AND wrapping token both changed is taken, so an old wrapping token is never unwrapped a second time."""

    def __init__(self, config: Config, options: Options, held: Held, wrapping_token: str, logger):
        self.config, self.options, self.held, self.logger = config, options, held, logger
        self.wrapping_token = wrapping_token  # the one `held` was unwrapped from
        self.failed: str | None = None  # a new volume token that could not be taken: said once
        self.spent: set[str] = set()  # rotated wrapping tokens whose unwrap went out without a token
        # A rotated token could not be taken after its unwrap went out: the node revokes the one held as
        # soon as it sees the new wrapping token gone (or after the rotation's grace), so it is watched.
        self.stranded = False

    def taken(self) -> Held | None:
        try:
            volume = source.read(self.options.volume_dir, self.config.token_filename, tries=1)
        except DriverError:
            return None  # mid-rotation, or the volume going away with the pod: the next poll looks again
        log.secret(volume.token)
        if not volume.wrapped or volume.accessor == self.held.accessor or volume.token == self.wrapping_token \
                or volume.token in self.spent:
            return None
        try:
            held = obtain(self.config, volume, self.options.out_dir, self.logger)
        except UnwrapSent as exc:
            self.spent.add(volume.token)
            self.stranded = True
            self.logger.error("cannot take the rotated token; keeping the current one until the node revokes it",
                              accessor=self.held.accessor, error=str(exc))
            return None
        except DriverError as exc:  # nothing sent (a CA unreadable, the out dir full): the next poll tries again
            if self.failed != volume.token:
                self.logger.error("cannot take the rotated token; keeping the current one", error=str(exc))
                self.failed = volume.token
            return None
        self.held, self.wrapping_token, self.stranded = held, volume.token, False
        return held


def _with_volume_ca(config: Config, volume: source.VolumeToken) -> Config:
    # The volume's ca.crt is Vault's CA as the node trusts it; VAULT_CACERT/VAULT_CAPATH still win.
    if volume.ca_path and not config.cacert and not config.capath:
        return config.replace(cacert=volume.ca_path)
    return config


def obtain(config: Config, volume: source.VolumeToken, out_dir: str, logger) -> Held:
    """The pod's token in `out_dir`: the one already there for this volume, or unwrapped now."""
    if not os.path.isdir(out_dir):
        raise DriverError(f"output dir {out_dir} does not exist: mount an emptyDir (medium: Memory) there, "
                          "or name it with --out")
    try:
        with output.locked(out_dir):
            output.drop_stale_temps(out_dir)
            record = output.read_record(out_dir)
            reused = bool(record and record["accessor"] == volume.accessor)
            ca = _read_ca(volume)  # before the unwrap: a CA that cannot be read must not cost the token
            if reused:
                held = _reuse(config, record, out_dir, logger)
                output.write(out_dir, held, config.vault_addr, ca)
            elif volume.wrapped:
                held = _unwrap(config, volume, out_dir, logger)
                _write_unwrapped(config, held, out_dir, ca, logger)
            else:
                held = _plain(config, volume)
                output.write(out_dir, held, config.vault_addr, ca)
    except OSError as exc:
        raise DriverError(f"cannot write into {out_dir}: {exc.strerror or exc} (the pod's user must be able to "
                          "write there: an emptyDir under the pod's fsGroup)") from None
    logger.info("token ready", accessor=held.accessor, reused=reused, lease_duration=held.lease_duration,
                renewable=held.renewable)
    return held


def _reuse(config: Config, record: dict, out_dir: str, logger) -> Held:
    """A restart: the token is already out. Vault is asked whether it still lives, and is the one recorded."""
    token = record["clientToken"]
    log.secret(token)
    try:
        info = Vault(config, token).lookup_self("the pod's token")
    except VaultDenied as exc:
        raise DriverError(f"the pod's token (accessor {record['accessor']}) was already unwrapped by an earlier "
                          f"run and is no longer valid (revoked or expired): {exc}; the pod needs a new "
                          "volume: delete the pod") from None
    except VaultUnavailable as exc:
        logger.warning("cannot check the token already unwrapped; using it", accessor=record["accessor"],
                       error=str(exc))
        info = {}
    # The out dir is shared with the pod's other containers: a record naming this volume's accessor over
    # another token would hand that token out, and leave the volume's own wrapping token for anyone.
    if info and info.get("accessor") != record["accessor"]:
        raise DriverError(f"{out_dir}/{output.RECORD_FILE} names this volume's token (accessor {record['accessor']}) "
                          f"but holds another one (accessor {info.get('accessor')}): not written by this command; "
                          "possible tampering by another container of the pod: treat the pod as compromised and "
                          "delete it (its unmount revokes the volume's token). Nothing was used or unwrapped")
    return Held(token, record["accessor"], int(info.get("ttl", record.get("leaseDuration") or 0)),
                bool(info.get("renewable", record.get("renewable"))))


def _unwrap(config: Config, volume: source.VolumeToken, out_dir: str, logger) -> Held:
    # Noted before it is sent, dropped once the token is written: a run that ends in between (killed, its
    # answer lost, the out dir full) leaves it, and the next run says why the wrapping token is spent
    # instead of suspecting interception. A note that cannot be written stops the run before the unwrap.
    earlier = output.unanswered(out_dir, volume.accessor)
    if earlier is None:
        try:
            output.note_unanswered(out_dir, volume.accessor, time.time())
        except OSError as exc:
            raise DriverError(f"cannot write into {out_dir}: {exc.strerror or exc}; nothing was unwrapped (the "
                              "wrapping token is still good: the next run tries again)") from None
    # Never resent: a gateway that passed the first one on and then failed would make the second
    # find a used token (and blame an interceptor).
    client = Vault(config.replace(max_retries=0), volume.token)
    try:
        response = client.unwrap_self()
    except VaultDenied as exc:
        if earlier is None:  # Vault refused this run's unwrap: nothing of it to remember
            output.forget_unanswered(out_dir)
        raise UnwrapSent(_unwrap_refused(volume, exc, earlier)) from None
    except VaultUnavailable as exc:
        if exc.unsent:  # refused, sealed, TLS, 429: Vault never saw it, so nothing of it to remember
            if earlier is None:
                output.forget_unanswered(out_dir)
            raise DriverError(f"{exc}; nothing was unwrapped (the request never reached Vault): the next restart "
                              "of this container tries again") from None
        raise UnwrapSent(f"{exc}; if Vault acted on it anyway the wrapping token is now used and this pod needs a "
                        "new volume (delete the pod); otherwise the next restart of this container tries again") \
            from None
    auth = (response or {}).get("auth") if isinstance(response, dict) else None
    if not auth or not auth.get("client_token"):
        output.forget_unanswered(out_dir)  # answered: the next run must not blame a lost answer
        raise UnwrapSent(f"the wrapping token in {volume.directory} did not wrap a Vault token")
    held = Held(auth["client_token"], auth.get("accessor", ""), int(auth.get("lease_duration") or 0),
                bool(auth.get("renewable")))
    log.secret(held.token)
    if held.accessor != volume.accessor:
        output.forget_unanswered(out_dir)
        _revoke_quietly(config, held.token, logger)
        raise UnwrapSent(f"the wrapping token in {volume.directory} wrapped a token (accessor {held.accessor}) "
                        f"other than the volume's ({volume.accessor}): possible tampering; it was revoked")
    held = _alive(config, volume, held)
    logger.info("unwrapped the volume's token", accessor=held.accessor)
    return held


def _alive(config: Config, volume: source.VolumeToken, held: Held) -> Held:
    """The unwrap hands back the answer of the token's creation: its lease counts from the mount, and a
    role's period shorter than the wrap TTL can be over by the time the pod starts. Vault is asked only
    when the lease may be over (the unwrap's note stays: the restart blames no interceptor)."""
    left = _lease_left(volume, held)
    if left is None or left > LEASE_SLACK:
        return held
    try:
        info = Vault(config, held.token).lookup_self("the pod's token just unwrapped")
    except VaultDenied:
        raise UnwrapSent(_expired(volume, held)) from None
    except VaultUnavailable:
        return held  # cannot tell now: it goes out as Vault gave it (a renewal or a restart finds out)
    return replace(held, lease_duration=int(info.get("ttl") or 0))


def _lease_left(volume: source.VolumeToken, held: Held) -> float | None:
    """Seconds left of the token's lease by the node's clock; None: it never expires. Unknown: 0 (ask Vault)."""
    if not held.lease_duration:
        return None
    if volume.created_at is None:
        return 0.0
    return volume.created_at + held.lease_duration - time.time()


def _expired(volume: source.VolumeToken, held: Held) -> str:
    since = "" if volume.created_at is None else \
        f" at {_iso(volume.created_at)}, and it was unwrapped {time.time() - volume.created_at:.0f}s later"
    return (f"the pod's token (accessor {held.accessor}) unwrapped from {volume.directory} had already expired: its "
            f"lease of {held.lease_duration}s (the token role's period or TTL) counts from the mount{since}; the "
            "role's period is shorter than the wrap TTL (VAULT_WRAP_TTL on the node): give the role a longer "
            "token_period, or the node a shorter VAULT_WRAP_TTL. Nothing was written; delete the pod to get a "
            "new volume")


def _unwrap_refused(volume: source.VolumeToken, exc: Exception, unanswered_at: float | None) -> str:
    where = f"the wrapping token in {volume.directory}"
    if "not valid or does not exist" not in str(exc).lower():
        return f"unwrapping {where} failed: {exc}"
    if unanswered_at is not None:
        cause = (f"an earlier run of this container sent the unwrap at {_iso(unanswered_at)} and got no answer it "
                 "could write out (the answer lost on the way, that run killed or its out dir full first, or the "
                 "token it got already expired): Vault most likely unwrapped it then (not necessarily interception)")
    elif volume.expires_at is not None and time.time() >= volume.expires_at:
        cause = (f"it expired at {_iso(volume.expires_at)} "
                 "(the volume's wrap TTL, VAULT_WRAP_TTL on the node, ran out before the pod unwrapped it)")
    else:
        cause = ("it was already unwrapped by another reader: POSSIBLE INTERCEPTION if no other container of "
                 "this pod unwraps it (give every consumer this command's output, not the volume); treat the "
                 "pod's token as compromised")
    return (f"{where} cannot be unwrapped: {cause}. Nothing was written; delete the pod to get a new volume "
            f"(its unmount revokes the token, accessor {volume.accessor})")


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _plain(config: Config, volume: source.VolumeToken) -> Held:
    """An unwrapped volume (vault/unwrap): the token is already plain; ask Vault for its lease."""
    try:
        info = Vault(config, volume.token).lookup_self("the volume's token")
    except VaultDenied as exc:
        raise DriverError(f"the token in {volume.directory} is not valid (revoked or expired): {exc}") from None
    if info.get("accessor") != volume.accessor:
        raise DriverError(f"the token in {volume.directory} is not the one its metadata names")
    return Held(volume.token, volume.accessor, int(info.get("ttl") or 0), bool(info.get("renewable")))


def _read_ca(volume: source.VolumeToken) -> bytes | None:
    if not volume.ca_path:
        return None
    try:
        with open(volume.ca_path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DriverError(f"cannot read {volume.ca_path}: {exc.strerror}") from None


def _write_unwrapped(config: Config, held: Held, out_dir: str, ca: bytes | None, logger) -> None:
    """A token just unwrapped goes out, or is revoked: its wrapping token is spent, so one the pod never
    got is one nobody can use (unless the record naming it was written: the next run heals from that)."""
    try:
        output.write(out_dir, held, config.vault_addr, ca)
    except OSError as exc:
        record = output.read_record(out_dir)
        if record and record["accessor"] == held.accessor:
            raise
        _revoke_quietly(config, held.token, logger)
        raise UnwrapSent(f"the pod's token was unwrapped but could not be written into {out_dir} "
                        f"({exc.strerror or exc}): it was revoked, and its wrapping token is spent; delete the pod "
                        "to get a new volume (and give this command a writable out dir with room)") from None


def _revoke_quietly(config: Config, token: str, logger) -> None:
    try:
        Vault(config, token).revoke_self("a token the pod must not use")
    except DriverError as exc:
        logger.warning("could not revoke it", error=str(exc))
