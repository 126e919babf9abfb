"""The FlexVolume wire protocol: kubelet argv in, exactly one JSON object out.

The kubelet reads stdout and stderr as one buffer that must be a single JSON object, so
both descriptors are pointed at /dev/null for the whole call (a stray warning from any
library cannot corrupt the answer) and the answer is written to a saved copy of stdout.
Nothing here raises.

Imports sit in the functions that use them: `init` runs on every plugin probe and loads nothing but
this module, and a relayed call loads only `relay`; a brokered mount or unmount loads the engine and
`broker` and, of the stdlib, only what they use (no HTTP stack, no json/re, dataclasses, typing, hashlib,
threading, contextlib: docs/performance-flexvolume.md); tests/test_exec_path.py checks all three.
"""

# No `from __future__ import annotations` (it imports __future__ at run time, ~0.1 ms of `init`): these
# annotations are valid at run time.
# _signal: built in, loaded at start-up; `signal`, its wrapper, imports enum (~4.5 ms, python -S -X importtime).
import _signal
import os
import sys
import time  # built in: no file to load

from ..errors import BadRequest, DriverError

SUCCESS, FAILURE, NOT_SUPPORTED = "Success", "Failure", "Not supported"
MAX_OPTIONS_BYTES = 64 * 1024

K8S = "kubernetes.io/"


class BadCall(BadRequest):
    """The kubelet call itself is malformed: the message names the argument or option."""


class Stopped(BaseException):
    """A stop signal during a kubelet call, raised where the call is so that its undo runs (as SIGINT's
    KeyboardInterrupt). Not a DriverError: an interrupted create may have minted (engine.intents)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"the call was stopped by {STOP_SIGNALS.get(self.signum, self.signum)} before it finished"


STOP_SIGNALS = {_signal.SIGTERM: "SIGTERM", _signal.SIGHUP: "SIGHUP", _signal.SIGINT: "SIGINT"}


def answer(status: str, message: str | None = None, **extra) -> dict:
    reply = {"status": status}
    if message:
        reply["message"] = message
    reply.update(extra)
    return reply


def parse_options(text: str) -> dict[str, str]:
    from .. import jsonlite  # not for init, whose answer is fixed (and not `json`: see jsonlite)

    if len(text.encode("utf-8", errors="replace")) > MAX_OPTIONS_BYTES:
        raise BadCall(f"options JSON is larger than {MAX_OPTIONS_BYTES} bytes")
    try:
        options = jsonlite.loads(text)
    except ValueError as exc:
        raise BadCall(f"options are not valid JSON: {exc}") from None
    except RecursionError:  # json's parser recurses once per nesting level: `[[[[...` exhausts the stack
        raise BadCall("options are not valid JSON: nested too deeply") from None
    if not isinstance(options, dict):
        raise BadCall(f"options must be a JSON object, got {type(options).__name__}")
    for key, value in options.items():
        if not isinstance(value, str):
            raise BadCall(f"option {key!r} must be a string, got {type(value).__name__}")
    return options


def parse_fs_group(text: str | None) -> int | None:
    from ..engine.attributes import is_group_id  # loaded by the mount that calls this anyway

    if text is None or text == "":
        return None
    if not is_group_id(text):
        raise BadCall(f"option '{K8S}mounterArgs.FsGroup' must be a group id, got {text!r}")
    return int(text)


def mount_request(mount_dir: str, options: dict[str, str], default_role: str):
    from ..engine import attributes  # the engine: a call the driver does itself, never init or a relayed one
    from ..engine.operation import MountRequest

    attributes.require_known(options, noun="option")  # as CSI does: a typo'd vault/ option is not ignored
    return MountRequest(
        mount_dir=mount_dir,
        policies=attributes.policies(options.get(attributes.POLICIES), noun="option"),
        role=attributes.role(options.get(attributes.ROLE), default_role, noun="option"),
        pod_namespace=options.get(K8S + "pod.namespace", ""),
        pod_name=options.get(K8S + "pod.name", ""),
        pod_uid=options.get(K8S + "pod.uid", ""),
        service_account=options.get(K8S + "serviceAccount.name", ""),
        volume_name=options.get(K8S + "pvOrVolumeName", ""),
        fs_group=parse_fs_group(options.get(K8S + "mounterArgs.FsGroup")),
        read_only=options.get(K8S + "readwrite") == "ro",
        unwrapped=attributes.flag(options, attributes.UNWRAP, noun="option"),
    )


# fsGroup: false -- we chgrp the files ourselves (0440 root:fsGroup); the kubelet's own pass
# would make the token file group-writable.
INIT_ANSWER = answer(SUCCESS, capabilities={"attach": False, "fsGroup": False})
# init runs on every plugin probe: its fixed answer is pre-encoded so the call never imports json.
INIT_PAYLOAD = b'{"status": "Success", "capabilities": {"attach": false, "fsGroup": false}}\n'


def init(_args: list[str], _settings=None) -> dict:
    return INIT_ANSWER


def mount(args: list[str], settings) -> dict:
    # The kubelet sends `mount <dir> <json>`; very old ones sent `mount <dir> <device> <json>`.
    if len(args) not in (2, 3):
        raise BadCall(f"mount takes <mount dir> <json options>, got {len(args)} arguments")
    mount_dir, options = args[0], parse_options(args[-1])
    config = _valid(settings)
    request = mount_request(mount_dir, options, config.role_name)
    return answer(SUCCESS, _engine(config).mount(request))


def unmount(args: list[str], settings) -> dict:
    if len(args) != 1:
        raise BadCall(f"unmount takes <mount dir>, got {len(args)} arguments")
    config = _valid(settings)
    return answer(SUCCESS, _engine(config).unmount(args[0]))


# How this call reaches Vault: "broker" (the node agent makes its Vault calls: flexvolume.broker) or
# "standalone: <why>" (hvac in this process). Decided in an exec before anything is sent; None in the
# agent, whose relay runs these verbs with its own Vault client.
vault_path: str | None = None
_in_exec = False  # main() sets it: only a kubelet's exec looks for the broker


def _engine(config):
    from ..engine.operation import Engine  # the engine: a call the driver does itself, never init or a relayed one

    global vault_path
    if not _in_exec:
        return Engine(config)
    from . import broker

    found, why = broker.find(config.broker_socket, os.environ)
    vault_path = "broker" if found else f"standalone: {why}"
    return Engine(config, vault=found) if found else Engine(config)


def _valid(settings):
    """The call's Config, or the error its settings had (the call's answer), checked after its arguments."""
    config, problem = settings
    if problem is not None:
        raise problem
    return config


VERBS = {"init": init, "mount": mount, "unmount": unmount}


def handle(argv: list[str], settings=None) -> dict:
    """One call to one answer. Every exception becomes a Failure; nothing propagates.

    `settings`: the call's `config.load()` result (the node agent's relay loads the caller's).
    Every call but `init` (a fixed answer the kubelet probes with, kept free of imports) leaves
    one outcome line in the log.
    """
    verb = VERBS.get(argv[0]) if argv else None
    if verb is init:
        return INIT_ANSWER
    started = _now()
    if verb is None:
        reply = answer(NOT_SUPPORTED, f"verb {argv[0]!r} is not supported" if argv else "no verb given")
    else:
        try:
            reply = verb(argv[1:], settings or load_settings())
        except BaseException as exc:  # noqa: BLE001 -- the answer must always be JSON
            _note_failure(exc)
            reply = answer(FAILURE, _describe(exc))
    _log_outcome(argv, reply, _now() - started)
    return reply


def load_settings(env=None):
    """`config.load(env)`: the call's settings, read once (`init` never reads them)."""
    from ..config import load  # not for init (dataclasses -> inspect) nor a relayed call

    return load(env)


def _log_outcome(argv: list[str], reply: dict, seconds: float) -> None:
    """verb, dir, pod, result, duration, error: what an operator looks for first. Never raises."""
    try:
        from .. import log  # only a call that logs

        verb, args = (argv[0], argv[1:]) if argv else ("", [])
        # Only a path: an unknown verb's first argument may be the options, secrets included.
        path = args[0] if args and args[0].startswith("/") else None
        fields = {"verb": verb, "dir": path, **_pod_of(verb, args), "result": reply["status"],
                  "ms": round(seconds * 1000, 1)}
        if vault_path:  # a standalone call says it is the fallback, and why
            fields["vault"] = vault_path
        if reply["status"] != SUCCESS:
            fields["error"] = reply.get("message")
        logger = log.get()
        (logger.info if reply["status"] == SUCCESS else logger.warning)("driver call", **fields)
    except BaseException:  # noqa: BLE001 -- a log that cannot be written must not change the answer
        pass


def _pod_of(verb: str, args: list[str]) -> dict[str, str]:
    """The pod as the kubelet names it: the options' namespace/name, and the uid in the volume dir
    (<pods dir>/<pod uid>/volumes/<driver>/<volume>; an option cannot choose it)."""
    parts = args[0].rstrip("/").split("/") if args else []
    pod = {"pod_uid": parts[-4]} if len(parts) >= 4 and parts[-3] == "volumes" else {}
    if verb == "mount" and len(args) in (2, 3):
        try:
            options = parse_options(args[-1])
        except Exception:  # noqa: BLE001 -- the call's answer named the defect; its log line must still be written
            return pod
        name = "/".join(p for p in (options.get(K8S + "pod.namespace"), options.get(K8S + "pod.name")) if p)
        pod.update({"pod": name} if name else {})
    return pod


def _note_failure(exc: BaseException) -> None:
    try:
        from .. import telemetry  # not for init nor a relayed call (the agent counts it)

        telemetry.failed(exc)
    except BaseException:  # noqa: BLE001
        pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (DriverError, Stopped)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    # A bug: say what it is; the traceback goes to the log.
    try:
        from .. import log  # only a call that logs

        log.get().error("unexpected error", exc_info=exc)
    except BaseException:  # noqa: BLE001
        pass
    return f"internal error: {type(exc).__name__}: {exc}"


def encode(reply: dict) -> tuple[bytes, int]:
    """The bytes the kubelet reads for `reply`, and the exit code to go with them."""
    if reply == INIT_ANSWER:
        return INIT_PAYLOAD, 0
    from .. import jsonlite  # not for init: its answer is pre-encoded

    try:
        payload = jsonlite.dumps(reply)
    except (TypeError, ValueError):
        reply = answer(FAILURE, "internal error: unserialisable answer")
        payload = jsonlite.dumps(reply)
    return payload.encode("utf-8") + b"\n", 1 if reply["status"] == FAILURE else 0


def main(argv: list[str]) -> int:
    global _in_exec, _deaf
    _in_exec = True
    reply_fd = _silence_std_streams()
    counted = bool(argv) and argv[0] in ("mount", "unmount")  # not init: it runs on every probe
    relayed = settings = None
    try:
        for signum in STOP_SIGNALS:
            _signal.signal(signum, _stop)
        started = _now() if counted else 0.0
        relayed = _relay(argv)
        if relayed is None and counted:
            _begin()  # only now: a relayed call is the agent's to count
        if relayed is None and argv[:1] != ["init"]:
            settings = _configure()
        if _stopped:  # swallowed on the way (the relay client's fallback, counting): the call is not to be made
            raise Stopped(_stopped)
        payload, code = relayed if relayed is not None else encode(handle(argv, settings))
    except BaseException as exc:  # noqa: BLE001 -- a bug in the relay client still answers JSON
        _deaf = True
        payload, code = encode(answer(FAILURE, _describe(exc)))
    _deaf = True  # the answer is going out: nothing may change it now
    os.write(reply_fd, payload)
    if counted and relayed is None:  # a relayed call is counted by the agent that did it
        _finish(argv[0], code == 0, started, settings)
    # The answer is out and nothing is left to flush (log lines are flushed one by one, state files
    # are fsynced and closed): skip the interpreter's teardown, ~3 ms of every kubelet call.
    os._exit(code)


def _now() -> float:
    return time.monotonic()


_stopped = 0  # the stop signal raised into the call
_deaf = False  # once a stop was raised (its undo must run to the end) and once the answer is going out


def _stop(signum: int, _frame) -> None:
    global _stopped, _deaf
    if _deaf:
        return
    _stopped, _deaf = signum, True
    raise Stopped(signum)


def _configure():
    """This call's settings, read once, and the log set up from them (an invalid setting still logs)."""
    from .. import log  # only a call that logs

    settings = load_settings()
    log.configure(settings[0], lean=True)  # no structlog in a kubelet call (see log)
    return settings


def _begin() -> None:
    try:
        from .. import telemetry  # not for init nor a relayed call (the agent counts it)

        telemetry.begin()
    except BaseException:  # noqa: BLE001 -- counting must never fail the call
        pass


def _finish(verb: str, ok: bool, started: float, settings) -> None:
    """One record for the agent's /metrics, spooled in the state dir (see telemetry); never fails the call."""
    try:
        from .. import telemetry  # not for init nor a relayed call (the agent counts it)
        from . import relay  # mount and unmount only

        telemetry.finish(verb, ok, time.monotonic() - started, settings[0].state_dir,
                         relay="fallback" if relay.fell_back else "")
    except BaseException:  # noqa: BLE001
        pass


def _relay(argv: list[str]) -> tuple[bytes, int] | None:
    """mount/unmount go to the warm node agent when one takes them (see relay); None: do it here."""
    if not argv or argv[0] not in ("mount", "unmount"):
        return None
    try:
        from . import relay  # mount and unmount only
    except ImportError:
        return None
    return relay.forward(argv)


def _silence_std_streams() -> int:
    reply_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stdout = sys.stderr = open(os.devnull, "w")
    return reply_fd
