"""The driver call's Vault, brokered: the engine's VaultClient over the node agent's unix socket.

A driver call that talks to Vault itself loads hvac, requests and urllib3 first (~200 ms, most of a
standalone mount). The agent beside it has them loaded and its connections to Vault kept alive, so
the call keeps the filesystem part (lock, record, tmpfs, files: it runs as the kubelet's child, with
mount privilege) and sends only its few Vault calls here. The agent needs no mount privilege.

Stdlib only, as `relay` (whose framing, banner check and root-peer check this shares):
  agent  -> driver  BANNER
  driver -> agent   one request frame: [op, JSON arguments] and the call's settings
  agent  -> driver  "<0|1>\\n<JSON answer>\\n"
One request per connection. A create (a mint) keeps its connection open until this process ends:
its end (exit, crash or kill -9) tells the agent the call is over, and the agent then keeps the
token only if the volume's record names it, else revokes it (node.broker_server).

The broker is chosen before anything is sent (`find`): no socket, or nobody root answering with the
banner, and the call talks to Vault itself (standalone, logged as such). Once chosen, a request that
fails is that call's error, never redone here: a create the agent may have sent must not be sent twice.
"""

from __future__ import annotations

import os
import time

from .. import jsonlite
from ..errors import DriverError, TokenNotWrapped, VaultBusy, VaultDenied, VaultRateLimited, VaultUnavailable
from . import relay

BANNER = b"vaulttmpfs-broker/1\n"
REPLY_TIMEOUT = 120.0  # as relay's: above the agent's own Vault deadline
# The agent waits this long for the request on a connection `find` checked (the relay's REQUEST_TIMEOUT
# is 10 s): a call that waited on its volume's lock longer connects again rather than use it.
FIRST_FRESH = 5.0
MINTS = ("create_wrapped_token", "create_token", "login_jwt_wrapped")
UNKNOWN_OP = "the broker does not do"  # how an agent answers an op it does not know (older agents too)
# Test hook, off by default: set, a driver call stops itself (SIGSTOP) once a mint is answered, before
# it writes the volume's record; the tests kill -9 it there, or continue it. Read from the environment
# the kubelet gave the call.
STOP_AFTER_MINT = "VAULTTMPFS_TEST_HOOK_STOP_AFTER_MINT"


class Broker:
    """The agent's broker for this call, and the engine's VaultFactory (`broker(config, token)`)."""

    def __init__(self, path: str, env, first):
        self.path = path
        self.env = env
        self._first = first  # the connection `find` checked: the first request goes on it
        self._found = time.monotonic()
        self._held: list = []  # mint connections, open until the process ends (see the module docstring)

    def __call__(self, _config, token: str | None) -> BrokerVault:
        return BrokerVault(self, token)

    def request(self, op: str, args: dict, hold: bool = False) -> object:
        sock, self._first = self._first, None
        if sock is not None and time.monotonic() - self._found > FIRST_FRESH:
            sock.close()  # the agent may have dropped it (nothing was sent on it)
            sock = None
        try:
            if sock is None:
                sock = relay._connect(self.path, BANNER)
            sock.sendall(relay.encode_request([op, jsonlite.dumps(args)], self.env, os.uname().nodename))
            sock.settimeout(REPLY_TIMEOUT)
            payload, code = relay.decode_reply(_read_reply(sock))
            answer = jsonlite.loads(payload)
        except (OSError, ValueError, relay.Refused) as exc:
            if sock is not None:
                sock.close()
            raise VaultUnavailable(f"the node agent's Vault broker ({self.path}) did not answer "
                                   f"({exc or type(exc).__name__}); not redone here, which could mint a second "
                                   "token: the kubelet will call again") from None
        if hold:
            self._held.append(sock)
        else:
            sock.close()
        if code != 0:
            raise _error(answer)
        return answer["result"]


def _read_reply(sock) -> bytes:
    # One answer, then the agent waits (a mint) or closes: read up to the answer's final newline.
    data = b""
    while data.count(b"\n") < 2 and len(data) <= relay.MAX_FRAME:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _error(answer: dict) -> DriverError:
    kind, message = answer.get("error"), str(answer.get("message") or "the Vault broker failed")
    if kind == "TokenNotWrapped":
        return TokenNotWrapped(message, answer.get("accessor"))
    kinds = {"VaultDenied": VaultDenied, "VaultUnavailable": VaultUnavailable, "VaultRateLimited": VaultRateLimited,
             "VaultBusy": VaultBusy}
    error = kinds.get(kind, DriverError)(message)
    if answer.get("unsent") is True and isinstance(error, VaultUnavailable):
        error.unsent = True  # as the agent's client knew it: the create never reached Vault
    return error


class BrokerVault:
    """vault.client.Vault's calls the engine makes (interfaces.VaultClient), made by the agent."""

    def __init__(self, broker: Broker, token: str | None):
        self.broker = broker
        self.token = token

    def _mint(self, op: str, volume, **args) -> dict:
        if not volume or not volume[0]:
            raise DriverError("a brokered mint needs the volume it is for")  # the broker's key
        result = self.broker.request(op, {**args, "token": self.token, "volume": list(volume)}, hold=True)
        if self.broker.env.get(STOP_AFTER_MINT):
            import signal

            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    def create_wrapped_token(self, role, policies, metadata, display_name, volume=None) -> dict:
        return self._mint("create_wrapped_token", volume, role=role, policies=list(policies), metadata=metadata,
                          display_name=display_name)

    def create_token(self, role, policies, metadata, display_name, volume=None) -> dict:
        return self._mint("create_token", volume, role=role, policies=list(policies), metadata=metadata,
                          display_name=display_name)

    def login_jwt_wrapped(self, mount, role, jwt, volume=None) -> dict:
        return self._mint("login_jwt_wrapped", volume, mount=mount, role=role, jwt=jwt)

    def revoke_accessor(self, accessor: str) -> bool:
        return bool(self.broker.request("revoke_accessor", {"accessor": accessor, "token": self.token}))

    def revoke_accessors(self, accessors: list[str]) -> list[bool | DriverError]:
        """All in one request, made at once by the agent (an unmount's pod and wrapping tokens)."""
        try:
            answers = self.broker.request("revoke_accessors", {"accessors": list(accessors), "token": self.token})
        except DriverError as exc:
            if not str(exc).startswith(UNKNOWN_OP):
                raise
            return [self._revoke_one(accessor) for accessor in accessors]  # an agent from before the batch
        return [_error(answer) if "error" in answer else bool(answer["result"]) for answer in answers]

    def _revoke_one(self, accessor: str) -> bool | DriverError:
        try:
            return self.revoke_accessor(accessor)
        except DriverError as exc:
            return exc

    def lookup_self(self) -> dict:
        return self.broker.request("lookup_self", {"token": self.token})

    def read_token_role(self, name: str) -> dict | None:
        """The role's lifetime bounds a lost create's token (engine.intents); read at most once an hour."""
        return self.broker.request("read_token_role", {"name": name, "token": self.token})


def find(path: str, env) -> tuple[Broker | None, str]:
    """The broker at `path` if root serves it with the banner now; else None and why (the call then
    talks to Vault itself). Nothing has been sent either way."""
    try:
        return Broker(path, env, relay._connect(path, BANNER)), ""
    except FileNotFoundError:
        return None, f"no broker socket at {path}"
    except (OSError, relay.Refused) as exc:
        return None, f"the broker at {path} did not answer: {exc or type(exc).__name__}"
