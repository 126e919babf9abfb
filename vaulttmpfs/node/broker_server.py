"""The agent's Vault broker: the driver calls' Vault requests, made on warm clients (flexvolume.broker).

The driver call does the filesystem part itself; the agent only talks to Vault, so it needs no mount
privilege. What keeps a token from outliving its pod when a call dies half-way:

- A mint is journalled (<state dir>/broker/<hash>.json: the volume and the accessors) before its
  answer is sent (fsync'd while it goes: _write_journal), and its connection stays open until the
  driver call ends. When it ends (exit, crash, kill -9), the broker takes the volume's lock (the
  call's lock is released with it) and keeps the token only if the volume's record names it;
  otherwise it revokes it (or queues the revocation as unmount does). Either way the journal entry goes.
- One mint per volume (resolved mount dir, pod uid) at a time: a kubelet retry that asks for the same
  token while the first call's mint is still in flight, or answered to a call that is gone and not yet
  settled, is handed that token. The create is never sent to Vault twice.
- An agent that dies with journal entries left settles them when it starts again (and every
  SWEEP_INTERVAL after): a record that names the token keeps it, else it is revoked.
A token Vault made whose answer the agent never got (killed while Vault answered) is nobody's to
know of, as for a standalone call killed at that moment: the token role's TTL bounds it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from .. import log
from ..errors import DriverError
from ..flexvolume import broker, protocol
from .relay_server import RelayServer

JOURNAL_DIR = "broker"
SWEEP_INTERVAL = 300.0
VAULT_THREADS = 8  # long-lived, so each keeps its warm clients (vault.client keeps them per thread)
OPS = set(broker.MINTS) | {"revoke_accessor", "revoke_accessors", "lookup_self", "read_token_role"}


@dataclass
class _Mint:
    """One volume's mint: who it is for now, and its answer once Vault gave it."""

    volume: tuple[str, str]
    asked: str  # the create's arguments: a retry is handed this token only if it asks for the same one
    owner: object  # the connection the answer belongs to
    state_dir: str
    done: threading.Event = field(default_factory=threading.Event)
    answer: tuple[bytes, int] | None = None
    accessors: list[str] = field(default_factory=list)
    journalled: object = None  # the journal entry's fsync, under way once it is written (files.Sync)
    revoked: bool = False  # a call revoked its tokens (a retry's stale record): never handed over
    asked_at: float = field(default_factory=time.time)  # when the create was asked for (the call's intent: just before)


class BrokerServer(RelayServer):
    name = "broker"
    banner = broker.BANNER

    def __init__(self, config):
        super().__init__(config, path=config.broker_socket)
        self._mints: dict[tuple[str, str], _Mint] = {}
        self._vault = concurrent.futures.ThreadPoolExecutor(VAULT_THREADS, thread_name_prefix="broker-vault")
        self.counts.update(minted=0, handed_over=0, revoked_orphans=0)

    def start(self) -> None:
        super().start()
        threading.Thread(target=self._sweep_loop, name="broker-sweep", daemon=True).start()

    def stop(self) -> None:
        super().stop()
        self._vault.shutdown(wait=False, cancel_futures=True)

    def respond(self, conn, argv, env, pid, logger) -> None:
        started = time.monotonic()
        try:
            op, args = argv[0], json.loads(argv[1])
            if op not in OPS or not isinstance(args, dict) or len(argv) != 2:
                raise DriverError(f"{broker.UNKNOWN_OP} {op!r}")
            config, problem = protocol.load_settings(env)  # the caller's settings, as the relay takes them
            if problem is not None:
                raise problem
            token = args.pop("token", None)
            log.secret(token)
        except (DriverError, ValueError) as exc:
            _send(conn, _failure(exc))
            return
        if op in broker.MINTS:
            self._serve_mint(conn, op, args, token, config, logger)
        elif op == "revoke_accessors":
            self._revoking(args.get("accessors"))
            _send(conn, self._revoke_all(config, token, args.get("accessors")))
        else:
            if op == "revoke_accessor":
                self._revoking([args.get("accessor")])
            _send(conn, _encode(self._vault.submit(_call, config, token, op, args).result()))
        self._count("relayed")
        logger.debug("brokered", op=op, peer_pid=pid, ms=round((time.monotonic() - started) * 1000, 1))

    def _revoking(self, accessors) -> None:
        """Before the revocation goes out: a mint holding one of these is dead, whatever Vault answers. A
        kubelet retry revokes the tokens of a call killed after its record, then asks for a mint of its own."""
        revoked = {a for a in accessors if isinstance(a, str)} if isinstance(accessors, list) else set()
        with self._lock:
            for mint in self._mints.values():
                if revoked & set(mint.accessors):
                    mint.revoked = True

    def _revoke_all(self, config, token, accessors) -> tuple[bytes, int]:
        """Each accessor's revocation on its own warm client, all at once; one answer per accessor."""
        if not isinstance(accessors, list) or not all(isinstance(a, str) and a for a in accessors):
            return _failure(DriverError("revoke_accessors takes a list of accessors"))
        calls = [self._vault.submit(_call, config, token, "revoke_accessor", {"accessor": a}) for a in accessors]
        return _success([call.result() for call in calls])

    # ---------------------------------------------------------------- mints

    def _serve_mint(self, conn, op, args, token, config, logger) -> None:
        volume = tuple(args.pop("volume", None) or ())
        if len(volume) != 2 or not all(isinstance(v, str) for v in volume) or not volume[0]:
            _send(conn, _failure(DriverError("a mint must name its volume (mount dir, pod uid)")))
            return
        logger = logger.bind(dir=volume[0], pod_uid=volume[1])
        asked = json.dumps([op, args], sort_keys=True)
        with self._lock:
            mint = self._mints.get(volume)
            handed = bool(mint and mint.asked == asked and not mint.revoked and _gone(mint.owner))
            if handed:
                mint.owner = conn
                self.counts["handed_over"] += 1
            elif mint and not _gone(mint.owner):
                # The volume's lock makes this a call that is not the kubelet's (or a bug): refuse it.
                mint = None
            else:
                mint = self._mints[volume] = _Mint(volume, asked, conn, config.state_dir)
        if mint is None:
            _send(conn, _failure(DriverError(f"another call is minting for {volume[0]} right now")))
            return
        if handed:
            logger.info("a retry takes the token minted for the call before it (not minted again)")
            mint.done.wait()
        else:
            try:
                answer = self._vault.submit(self._create, mint, config, token, op, args).result()
            except RuntimeError as exc:  # the agent is stopping: a retry waiting on this mint must not hang
                answer = _failure(DriverError(f"the node agent is stopping ({exc})"))
            with self._lock:
                mint.answer = answer
                self.counts["minted"] += 1
            mint.done.set()
        with self._lock:
            mine = mint.owner is conn
        if not mine:
            return  # handed over while Vault answered: the retry's connection answers and settles it
        _send(conn, mint.answer)
        _durable(mint, logger)
        _wait_until_closed(conn)
        self._settle(mint, conn, config, logger)

    def _create(self, mint: _Mint, config, token, op, args) -> tuple[bytes, int]:
        """The create, sent once; never raises (a retry may be waiting for this answer)."""
        from ..vault.client import TokenNotWrapped, Vault

        try:
            # With its volume: a mount's 429 says the kubelet retries.
            result = getattr(Vault(config, token), op)(**args, volume=mint.volume)
        except TokenNotWrapped as exc:
            # A live token the pod must not get: journalled too, so it is revoked if the call dies.
            return self._journal(mint, [exc.accessor] if exc.accessor else [],
                                 _failure(exc, accessor=exc.accessor), config)
        except DriverError as exc:
            return _failure(exc)
        except Exception as exc:  # noqa: BLE001 -- a bug still answers, and Vault is not asked again
            log.get(component="broker").error("broker mint failed", exc_info=exc)
            return _failure(DriverError(f"internal error in the node agent's broker: {type(exc).__name__}"))
        log.secret(result.get("token") or result.get("client_token"))
        pod, wrapping = (result.get("wrapped_accessor"), result.get("accessor")) if result.get("wrapped_accessor") \
            else (result.get("accessor"), None)
        return self._journal(mint, [a for a in (pod, wrapping) if a], _success(result), config)

    def _journal(self, mint: _Mint, accessors: list[str], answer, config) -> tuple[bytes, int]:
        """Before the answer leaves: whatever happens next, someone settles these accessors. A journal
        that cannot be written is a mint the pod does not get (revoked now)."""
        mint.accessors = accessors
        if accessors:
            try:
                mint.journalled = _write_journal(mint.state_dir, mint.volume, accessors)
            except OSError as exc:
                from ..engine.operation import Engine
                from ..engine.record import VolumeRecord

                outcome = Engine(config).revoke_or_queue(
                    VolumeRecord(accessors[0], accessors[1] if len(accessors) > 1 else None, pod_uid=mint.volume[1]),
                    log.get(component="broker"), why="the broker could not journal it")
                mint.accessors = []
                return _failure(DriverError(f"the node agent could not journal the new token ({exc.strerror}); "
                                            f"not given to the pod: {outcome}"))
        return answer

    def _settle(self, mint: _Mint, conn, config, logger) -> None:
        """The call that got this mint has ended: keep the token if its volume's record names it."""
        from ..engine.operation import Engine

        engine = Engine(config)
        with engine.store.locked(mint.volume[0]):  # the call's own lock, or its retry's, first
            with self._lock:
                if mint.owner is not conn:
                    return  # a retry took it while we waited
                if self._mints.get(mint.volume) is mint:  # not a retry's own mint, made once this one was revoked
                    del self._mints[mint.volume]
            if mint.accessors:  # before the journal goes: an agent killed in between still has the journal
                try:
                    _drop_intent_of(engine.store, mint)
                except OSError as exc:  # the note stays: status over-counts, nothing is lost
                    logger.error("the call's intent could not be dropped", error=str(exc))
            kept = _settle_accessors(engine, mint.volume, mint.accessors, logger)
        if not kept and mint.accessors:
            self._count("revoked_orphans")

    # ---------------------------------------------------------------- journal left by an agent that died

    def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.sweep(self.config)
            except Exception as exc:  # noqa: BLE001 -- retried next round
                log.get(component="broker").error("broker journal sweep failed", exc_info=exc)
            self._stopping.wait(SWEEP_INTERVAL)

    def sweep(self, config) -> int:
        """Settle the journal entries no live call holds (an earlier agent's); how many were settled."""
        from ..engine.operation import Engine

        settled = 0
        for path, entry in _journal_entries(config.state_dir):
            if self._live(entry["accessors"]):
                continue
            engine = Engine(config)
            logger = log.get(component="broker", dir=entry["mount_dir"], pod_uid=entry["pod_uid"])
            with engine.store.locked(entry["mount_dir"]):
                if self._live(entry["accessors"]):
                    continue  # minted by this agent meanwhile: its own call settles it (or a retry takes it)
                _settle_accessors(engine, (entry["mount_dir"], entry["pod_uid"]), entry["accessors"], logger)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            settled += 1
        return settled

    def _live(self, accessors: list[str]) -> bool:
        with self._lock:
            return any(set(mint.accessors) & set(accessors) for mint in self._mints.values())

    def status(self) -> dict:
        status = super().status()
        with self._lock:
            status["minting"] = len(self._mints)
        return status


def _settle_accessors(engine, volume: tuple[str, str], accessors: list[str], logger) -> bool:
    """Under the volume's lock: True if its record names these accessors (the record owns them now);
    else they are revoked or queued. The journal entry goes either way."""
    from ..engine.record import VolumeRecord

    record = engine.store.read_volume(volume[0])
    kept = bool(record and set(record.accessors()) & set(accessors))
    if accessors and not kept:
        outcome = engine.revoke_or_queue(VolumeRecord(accessors[0], accessors[1] if len(accessors) > 1 else None,
                                                      pod_uid=volume[1]),
                                         logger, why="the driver call that minted it ended without recording it")
        logger.warning("an orphaned mint settled", revocation=str(outcome))
    _drop_journal(engine.config.state_dir, accessors)
    return kept


INTENT_WINDOW = 0.25  # s: a call notes its intent just before it asks; the kubelet retries 0.5 s apart at the soonest


def _drop_intent_of(store, mint: _Mint) -> None:
    """The note the call wrote just before asking for this mint, if the call ended without dropping it
    (killed): the token is recorded or settled now, so it is not one that may be alive unrecorded. An
    older note of the volume (an earlier call's lost answer) is outside the window and stays."""
    for intent in store.list_intents(mint.volume[0]):
        name = str(intent.get("name") or "")
        noted = store.intent_noted_at(name)
        if noted is not None and 0 <= mint.asked_at - noted <= INTENT_WINDOW:
            store.drop_intent(name)


def _journal_path(state_dir: str, accessor: str) -> str:
    return os.path.join(state_dir, JOURNAL_DIR, hashlib.sha256(accessor.encode()).hexdigest()[:40] + ".json")


def _write_journal(state_dir: str, volume: tuple[str, str], accessors: list[str]):
    """In place before the answer leaves (this agent killed, the next one finds it); its fsync, under
    way meanwhile, is waited for once the answer is out (_durable). Only a power loss in between can
    lose it, while the driver call fsyncs its own record of the token and its intent counts it."""
    from ..engine import files

    os.makedirs(os.path.join(state_dir, JOURNAL_DIR), mode=0o700, exist_ok=True)
    data = json.dumps({"mount_dir": volume[0], "pod_uid": volume[1], "accessors": accessors,
                       "at": time.time()}).encode()
    return files.replace_then_sync(_journal_path(state_dir, accessors[0]), data, 0o600)


def _durable(mint: _Mint, logger) -> None:
    if mint.journalled is None:
        return
    try:
        mint.journalled.wait()
    except OSError as exc:  # the token is the call's now: its record, or this agent's settling, covers it
        logger.error("a broker journal entry could not be fsync'd", error=str(exc))


def _drop_journal(state_dir: str, accessors: list[str]) -> None:
    if accessors:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_journal_path(state_dir, accessors[0]))


def _journal_entries(state_dir: str):
    directory = os.path.join(state_dir, JOURNAL_DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as handle:
                entry = json.loads(handle.read(64 * 1024))
            accessors = [a for a in entry["accessors"] if isinstance(a, str) and a]
            yield path, {"mount_dir": str(entry["mount_dir"]), "pod_uid": str(entry.get("pod_uid") or ""),
                         "accessors": accessors}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # torn by a power loss before its fsync (the call's record or intent covers it)


def _call(config, token, op, args) -> dict:
    """{"result": ...}, or {"error": <kind>, "message": ...} (flexvolume.broker turns it back into the error)."""
    from ..vault.client import Vault

    try:
        return {"result": getattr(Vault(config, token), op)(**args)}
    except DriverError as exc:
        return _error_answer(exc)


def _error_answer(exc: Exception, **extra) -> dict:
    if getattr(exc, "unsent", False):
        extra["unsent"] = True  # the driver's intent of a create that certainly minted nothing is dropped
    return {"error": type(exc).__name__, "message": str(exc), **extra}


def _encode(answer: dict) -> tuple[bytes, int]:
    return json.dumps(answer).encode() + b"\n", 1 if "error" in answer else 0


def _success(result) -> tuple[bytes, int]:
    return _encode({"result": result})


def _failure(exc: Exception, **extra) -> tuple[bytes, int]:
    return _encode(_error_answer(exc, **extra))


def _send(conn, answer: tuple[bytes, int]) -> None:
    with contextlib.suppress(OSError):  # the caller is gone: a mint is settled all the same
        conn.sendall(b"%d\n" % answer[1] + answer[0])


def _gone(conn) -> bool:
    """The caller's end is closed (its process ended): a zero-byte peek without blocking."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _wait_until_closed(conn) -> None:
    conn.settimeout(None)  # as long as the call lives (the kubelet bounds it)
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass
