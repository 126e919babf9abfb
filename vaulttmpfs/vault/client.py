"""Vault (or OpenBao) through hvac: create wrapped tokens, revoke them, look up and renew.

hvac (and requests under it) costs ~200 ms to import, so nothing here is imported until a
verb really talks to Vault.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import stat
import threading
import time
import warnings
from typing import Any, Iterator

from .. import log, telemetry
from ..config import Config

# TokenNotWrapped lives in errors (the brokered exec path catches it without loading this module): re-exported.
from ..errors import DriverError, TokenNotWrapped, VaultDenied, VaultRateLimited, VaultUnavailable
from . import write_budget

# The build leaves charset_normalizer out (~20 ms and 3.5 MiB per call): Vault answers JSON, which
# requests decodes as UTF-8 without it. Its import-time complaint about that is noise.
warnings.filterwarnings("ignore", message="Unable to find acceptable character detection")

RETRY_STATUSES = (500, 502, 503, 504)
# hvac raises one class per status and keeps no status code on the exception.
_STATUS = {"InvalidRequest": 400, "Unauthorized": 401, "Forbidden": 403, "InvalidPath": 404,
           "PreconditionFailed": 412, "RateLimitExceeded": 429, "InternalServerError": 500,
           "VaultNotInitialized": 501, "BadGateway": 502, "VaultDown": 503}


def _session(config: Config, resend: bool):
    """resend=False for a call that mints a token: once it may have reached Vault it is never sent
    again (a gateway that forwards the create and then answers 502 would get two tokens minted).
    Only a connection that failed before the request went out is retried."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    class _Adapter(HTTPAdapter):
        def send(self, request, **kwargs):
            # Every call, a create too, is resent after a 429: a rate-limit quota answers it before the
            # request reaches its handler (nothing was minted). Within the call's deadline only.
            backoff = RATE_LIMIT_BACKOFF[0]
            redirects = 0
            if _calling.ask_active:
                # Asked of the active node: a standby that has applied less than this forwards it.
                request.headers["X-Vault-Index"] = _beyond(_calling.ask_active)
                request.headers["X-Vault-Inconsistent"] = "forward-active-node"
            while True:
                with write_budget.slot(request.method, _calling.deadline):
                    response = super().send(request, **kwargs)
                _calling.index = response.headers.get("X-Vault-Index") or _calling.index
                if 300 <= response.status_code < 400:
                    # Never followed (requests would re-send X-Vault-Token to wherever Location points,
                    # any host, https -> http too). OpenBao redirects (307) from a standby that cannot
                    # forward: http/handler.go respondStandby, reached when forwarding is off for the
                    # request or, in forwardRequest, when core.ForwardRequest failed. That last case
                    # means the active node may have acted on it (seen: a leader killed mid-create),
                    # so a redirect is not "not sent": a create after one is never resent or taken as
                    # unsent; an idempotent call is sent again to the same address, within its deadline.
                    _calling.redirected = True
                    where = _location(response)
                    response.close()
                    wait = _retry_after(None, backoff)
                    backoff = min(backoff * 2, RATE_LIMIT_BACKOFF[1])
                    if not resend or redirects >= config.max_retries or _calling.deadline is None \
                            or time.monotonic() + wait > _calling.deadline:
                        raise VaultUnavailable(
                            f"{_calling.action}: Vault at {config.vault_addr} answered {response.status_code} "
                            f"redirecting to {where}, {redirects + 1} time(s); vaulttmpfs does not follow "
                            "redirects (the token would go wherever it points): give VAULT_ADDR an address "
                            "that answers itself (a load balancer over healthy nodes, or a node with request "
                            "forwarding); retried later")
                    redirects += 1
                    time.sleep(wait)
                    continue
                if response.status_code != 429:
                    return response
                wait = _retry_after(response.headers.get("Retry-After"), backoff)
                backoff = min(backoff * 2, RATE_LIMIT_BACKOFF[1])
                telemetry.rate_limited(_calling.action)
                # Sent again only if a whole attempt still fits: one the deadline cuts may have been acted on.
                if _calling.deadline is None or time.monotonic() + wait + config.timeout > _calling.deadline:
                    return response  # hvac raises it: VaultRateLimited
                response.content  # read, so the connection goes back to the pool  # noqa: B018
                _calling.throttled += 1
                _calling.waited += wait
                time.sleep(wait)
                if wait > MINT_IDLE:
                    self.poolmanager.clear()  # idle that long: a create must not go out on it (MINT_IDLE)

        def init_poolmanager(self, *args, **kwargs):
            # VAULT_TLS_SERVER_NAME: the name sent in SNI and checked in Vault's certificate.
            if config.tls_server_name:
                kwargs["server_hostname"] = config.tls_server_name
                kwargs["assert_hostname"] = config.tls_server_name
            if config.capath and not config.cacert and not config.skip_verify:
                kwargs["ssl_context"] = _capath_context(config.capath)
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = _watched_pools()

    class _Retry(Retry):
        def get_backoff_time(self) -> float:
            # Never past the call's deadline: a watched call (not the main thread) has no SIGALRM to cut a sleep.
            backoff = super().get_backoff_time()
            if _calling.deadline is None:
                return backoff
            return min(backoff, max(_calling.deadline - time.monotonic(), 0.0))

    retry = _Retry(
        total=config.max_retries,
        connect=config.max_retries,
        # A request Vault may already have acted on is not sent twice (it would mint twice).
        read=0,
        other=0,
        status=config.max_retries if resend else 0,
        status_forcelist=RETRY_STATUSES if resend else (),
        allowed_methods=None,
        backoff_factor=0.1,
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    session.trust_env = False  # no proxies or netrc from the kubelet's environment
    session.max_redirects = 0  # and the adapter answers every 3xx with an error before requests could follow it
    # hvac lets a given session's verify/cert override its own arguments: set them here.
    session.verify = _verify(config)
    session.cert = _client_cert(config)
    session.mount("https://", _Adapter(max_retries=retry))
    session.mount("http://", _Adapter(max_retries=retry))
    return session


def _capath_context(capath: str):
    """Every PEM file in VAULT_CAPATH, as Vault's Go client reads it. OpenSSL's own capath
    lookup only finds certificates by hash-named links (`openssl rehash`); both work here."""
    import ssl

    from urllib3.util.ssl_ import create_urllib3_context

    context = create_urllib3_context()  # what urllib3 would build, without the system CAs
    with os.scandir(capath) as entries:
        for entry in entries:
            if entry.is_file():
                with contextlib.suppress(ssl.SSLError, ValueError, OSError):
                    context.load_verify_locations(cafile=entry.path)
    return context


def _verify(config: Config) -> bool | str:
    if config.skip_verify:
        return False
    # VAULT_CACERT wins over VAULT_CAPATH, as in Vault's own client.
    return config.cacert or config.capath or True


def _client_cert(config: Config) -> tuple[str, str] | str | None:
    if not config.client_cert:
        return None
    return (config.client_cert, config.client_key) if config.client_key else config.client_cert


def _location(response) -> str:
    """Where a redirect pointed, for the error: scheme, host and path only (a query is not shown)."""
    from urllib.parse import urljoin, urlsplit

    location = response.headers.get("Location")
    if not location:
        return "nowhere (no Location header)"
    parts = urlsplit(urljoin(response.url or "", location))
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _beyond(index: str) -> str:
    """An X-Vault-Index of the same cluster past any state it has reached: with X-Vault-Inconsistent:
    forward-active-node, a standby forwards the request to the active node instead of answering it
    from its own (possibly older) copy of storage. The index is OpenBao's base64 JSON
    {"cluster": ..., "value": "<raft index>"}; one we cannot read is sent as it came."""
    import base64
    import json

    try:
        state = json.loads(base64.b64decode(index))
        state["value"] = str(int(state["value"]) + 2**32)
        return base64.b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()
    except (ValueError, TypeError, KeyError):
        return index


def _check_files(config: Config) -> None:
    """OpenSSL opens these with blocking reads: a FIFO or a device named here would hang the call."""
    for setting, path in (("VAULT_CACERT", config.cacert), ("VAULT_CLIENT_CERT", config.client_cert),
                          ("VAULT_CLIENT_KEY", config.client_key)):
        try:
            regular = path is None or stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            continue  # missing: the TLS layer says so in its own words
        if not regular:
            raise DriverError(f"{setting}={path} is not a regular file")


def _vault_errors(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)
    return str(exc) or type(exc).__name__


def _sealed(exc: Exception) -> str | None:
    """"sealed" or "not initialized" when the answer is Vault's own saying so (a JSON errors list: OpenBao
    answers a sealed or uninitialised node's every request 503 {"errors":["Vault is sealed"]}; HashiCorp
    Vault's ErrNotInit says "Vault is not initialized"); None for any other 503/501."""
    errors = getattr(exc, "errors", None)
    said = [str(e).strip().lower() for e in errors] if isinstance(errors, list) else []
    if "vault is sealed" in said:
        return "sealed"
    if "vault is not initialized" in said:
        return "not initialized"
    return None


RATE_LIMIT_BACKOFF = (0.25, 4.0)  # seconds: the first wait when a 429 names none, doubling up to the second


def _retry_after(header: str | None, backoff: float) -> float:
    """Seconds to wait after a 429: its Retry-After (OpenBao sends one when sys/quotas/config has
    enable_rate_limit_response_headers) or `backoff`, whichever is longer; plus up to a quarter more, so the nodes a
    quota turned away do not all come back in the same instant."""
    try:
        # Never below the backoff: OpenBao rounds down, and sends "Retry-After: 0" in a window's last second
        # (taken as it came, calls resent hundreds of times a second until their deadline).
        wait = max(min(float(header), 60.0), backoff) if header else backoff
    except ValueError:  # an HTTP date: not worth parsing, back off instead
        wait = backoff
    return wait * random.uniform(1.0, 1.25)


class _Calling(threading.local):
    """The Vault call this thread is making (set by Vault._call), for its transport: when it must be
    over (time.monotonic()), what it is, and the 429s it waited out."""

    deadline: float | None = None
    action: str = ""
    throttled = 0
    waited = 0.0
    redirected = False  # a node answered with a redirect: the request reached Vault
    index: str | None = None  # the last X-Vault-Index an answer in this call carried (OpenBao's Raft state)
    ask_active: str | None = None  # an X-Vault-Index: ask the active node, not a standby (Vault.revoke_accessor)
    watch: _Watch | None = None  # the call's deadline outside the main thread (_deadline)


_calling = _Calling()


class _DeadlinePassed(BaseException):
    """Raised by SIGALRM inside whatever socket call is running; BaseException so no library swallows it."""


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[_Watch | None]:
    """Bound the whole call: a read timeout is per recv(), and a server dripping a byte at a time
    never trips it. In a process's main thread (a kubelet call) a SIGALRM raises _DeadlinePassed; in
    any other (the agent's CSI workers, its broker, its loops) the watchdog shuts the call's sockets
    down at the deadline, and the call's failure is then its deadline's (the watch says so)."""
    if not seconds:
        yield None
        return
    if threading.current_thread() is not threading.main_thread():
        watch = _watchdog().watch(seconds)
        outer, _calling.watch = _calling.watch, watch
        try:
            yield watch
        finally:
            watch.finish()  # from here on it never touches a socket (the connection may be back in the pool)
            _calling.watch = outer
        return

    def expire(*_args):
        raise _DeadlinePassed()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Watch:
    """One call's deadline in a thread that is not the main one, and the sockets it used."""

    __slots__ = ("deadline", "expired", "_done", "_lock", "_socks")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._done = False
        self._lock = threading.Lock()
        self._socks: list = []

    def add(self, sock) -> None:
        with self._lock:
            if self._done:
                return
            if self.expired:  # an attempt after the deadline (a retry): fails at once
                _cut(sock)
                return
            if sock not in self._socks:
                self._socks.append(sock)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._socks:
                _cut(sock)

    def finish(self) -> None:
        with self._lock:
            self._done = True
            self._socks.clear()

    @property
    def done(self) -> bool:
        return self._done


def _cut(sock) -> None:
    """Wake whoever reads it, with EOF. socket.socket's own shutdown, not SSLSocket's: that one unwraps
    (drops _sslobj) under the thread still reading. A socket already closed is left as it is."""
    import socket

    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread for every watched call: a heap of deadlines, and a wait for the earliest. Arming
    a watch is a lock and a heappush (the CSI path is CPU-bound: no thread, no timer per call); the
    thread is woken only when the earliest deadline changes. A finished watch leaves the heap when its
    deadline comes round; expiries are checked at most every GRAIN seconds."""

    GRAIN = 0.05

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float) -> _Watch:
        import heapq

        watch = _Watch(time.monotonic() + seconds)
        with self._cond:
            self._seq += 1
            earliest = not self._heap or watch.deadline < self._heap[0][0]
            heapq.heappush(self._heap, (watch.deadline, self._seq, watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vault-deadlines", daemon=True)
                self._thread.start()
            elif earliest:
                self._cond.notify()
        return watch

    def _run(self) -> None:
        import heapq

        with self._cond:
            while True:
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    watch = heapq.heappop(self._heap)[2]
                    if not watch.done:
                        due.append(watch)
                if due:
                    self._cond.release()  # a watch's lock is never taken under ours the other way round
                    try:
                        for watch in due:
                            watch.expire()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(max(self._heap[0][0] - now, self.GRAIN) if self._heap else None)


_dog: _Watchdog | None = None
_dog_lock = threading.Lock()


def _watchdog() -> _Watchdog:
    global _dog
    if _dog is None:
        with _dog_lock:
            if _dog is None:
                _dog = _Watchdog()
    return _dog


def _watch_socket(sock) -> None:
    """A socket this thread's call is about to use: cut at the call's deadline (none in the main thread)."""
    watch = _calling.watch
    if watch is not None and sock is not None:
        watch.add(sock)


_POOLS: dict | None = None


def _watched_pools() -> dict:
    """urllib3's pool classes, whose connections put their sockets under the calling thread's watch."""
    global _POOLS
    if _POOLS is not None:
        return _POOLS
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class _Watched:
        def _new_conn(self):
            sock = super()._new_conn()
            _watch_socket(sock)  # cut at once if the deadline has passed (a retry)
            return sock

        def connect(self):
            # A TLS handshake needs no cut: CPython's ssl bounds the whole handshake by the socket's timeout.
            super().connect()
            _watch_socket(self.sock)  # the TLS socket, once wrapped

        def request(self, *args, **kwargs):
            _watch_socket(self.sock)  # a kept-alive connection, used again by this call
            return super().request(*args, **kwargs)

    class _HTTP(_Watched, HTTPConnection):
        pass

    class _HTTPS(_Watched, HTTPSConnection):
        pass

    class _HTTPPool(HTTPConnectionPool):
        ConnectionCls = _HTTP

    class _HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = _HTTPS

    _POOLS = {"http": _HTTPPool, "https": _HTTPSPool}
    return _POOLS


@contextlib.contextmanager
def translate_errors(action: str, addr: str, deadline: float | None = None) -> Iterator[None]:
    """hvac/requests exceptions -> DriverError with what Vault said, for operators."""
    import hvac.exceptions as hexc
    import requests

    try:
        watch = None
        try:
            with _deadline(deadline) as watch:
                yield
        except Exception as exc:
            # Its sockets were cut at the deadline: a transport failure is the deadline's. Not unsent (Vault
            # may have acted). An answer that came whole (hvac's errors) and our own errors say their own.
            if watch is not None and watch.expired and isinstance(exc, requests.exceptions.RequestException):
                raise _DeadlinePassed() from None
            raise
    except _DeadlinePassed:
        raise VaultUnavailable(f"{action}: Vault at {addr} did not finish answering within {deadline:g}s") from None
    except hexc.VaultError as exc:
        status = _STATUS.get(type(exc).__name__, 0)
        if isinstance(exc, (hexc.VaultDown, hexc.VaultNotInitialized)):
            if (state := _sealed(exc)) is not None:  # Vault's own answer: it acts on nothing in that state
                raise _unsent(VaultUnavailable(f"{action}: Vault at {addr} is {state}: {_vault_errors(exc)}")) from None
            # Anybody's 503/501 (a gateway's after a reset upstream, possibly after forwarding a create)
            # may come after Vault acted: not unsent, and not said to be a seal.
            raise VaultUnavailable(f"{action}: Vault at {addr} answered {status}: {_vault_errors(exc)}") from None
        if status == 429:
            raise VaultRateLimited(f"{action}: Vault answered 429 (a rate-limit quota): {_vault_errors(exc)}") from None
        cls = VaultDenied if 400 <= status < 500 else VaultUnavailable
        raise cls(f"{action}: Vault answered {status or 'an error'}: {_vault_errors(exc)}") from None
    except requests.exceptions.SSLError as exc:
        raise _unsent(VaultUnavailable(
            f"{action}: TLS to {addr} failed ({_reason(exc)}); check VAULT_CACERT/VAULT_CAPATH/VAULT_TLS_SERVER_NAME"
        )) from None
    except requests.exceptions.ConnectTimeout:
        raise _unsent(VaultUnavailable(f"{action}: Vault at {addr} did not accept a connection in time")) from None
    except requests.exceptions.Timeout:
        raise VaultUnavailable(f"{action}: Vault at {addr} did not answer in time") from None
    except requests.exceptions.RetryError as exc:
        raise VaultUnavailable(f"{action}: Vault at {addr} kept failing: {_reason(exc)}") from None
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL):
        # requests quotes the offending header value (the token) in these: never passed on.
        raise DriverError(f"{action}: the request could not be sent (a header value, such as the token, "
                          "holds characters HTTP does not allow); its details are not shown") from None
    except requests.exceptions.RequestException as exc:
        # A read timeout that is not retried (read=0) reaches us dressed as a connection error.
        if type(_innermost(exc)).__name__ == "ReadTimeoutError":
            raise VaultUnavailable(f"{action}: Vault at {addr} did not answer in time (not resent: "
                                   "Vault may have acted on it)") from None
        failed = VaultUnavailable(f"{action}: cannot reach Vault at {addr}: {_reason(exc)}")
        if type(_innermost(exc)).__name__ in _BEFORE_SENDING:
            raise _unsent(failed) from None
        raise failed from None  # e.g. the connection dropped after the request went out


# urllib3's errors for a connection that never carried the request.
_BEFORE_SENDING = {"NewConnectionError", "ConnectTimeoutError", "NameResolutionError"}


def _unsent(exc: VaultUnavailable) -> VaultUnavailable:
    """Mark a failure as certainly before Vault saw the request (refused, sealed, TLS): a create that
    failed so minted nothing. Unmarked, a create's failure may have come after Vault acted. Not after a
    redirect: the node that redirected had the request (a standby may have forwarded it first)."""
    exc.unsent = not _calling.redirected
    return exc


def _reason(exc: Exception) -> str:
    return str(_innermost(exc))


def _innermost(exc: Exception) -> Exception:
    # requests nests urllib3's reason a few levels deep; the innermost is the readable one.
    inner: Any = exc
    for _ in range(4):
        nxt = getattr(inner, "reason", None) or (inner.args[0] if getattr(inner, "args", None) else None)
        if not isinstance(nxt, Exception):
            break
        inner = nxt
    return inner


def _new_client(config: Config, token: str | None, resend: bool):
    import hvac

    # Every argument explicit: hvac falls back to VAULT_TOKEN, ~/.vault-token, VAULT_CLIENT_CERT,
    # VAULT_CACERT... of this process when one is None, and in the node agent those are the
    # agent's, not the settings the driver forwarded with a relayed call.
    return hvac.Client(
        url=config.vault_addr,
        token=token or "",
        cert=_client_cert(config) or False,
        verify=_verify(config),
        timeout=config.timeout,
        namespace=config.namespace,
        session=_session(config, resend),
    )


# The node agent serves call after call: each of its threads keeps its last few clients, and their
# kept-alive connections, instead of building hvac + requests + a TCP (and TLS) connection per call.
KEEP_CLIENTS = 4  # per thread: the generator token's two clients, and room for a rotated token
CLIENT_MAX_AGE = 300.0  # then rebuilt: VAULT_CAPATH re-read, the address looked up again
# A token create is never resent, so it must not go out on a connection the server (or a gateway)
# may be closing for idleness right then: one idle longer than this is replaced first.
MINT_IDLE = 2.0
_warm = threading.local()


def _warm_client(config: Config, token: str | None, resend: bool):
    clients = getattr(_warm, "clients", None)
    if clients is None:
        clients = _warm.clients = {}
    key = (config, token or "", resend)
    now = time.monotonic()
    entry = clients.pop(key, None)  # re-inserted last: the dict's order is least recently used first
    if entry and (now - entry[1] > CLIENT_MAX_AGE or (not resend and now - entry[2] > MINT_IDLE)):
        entry[0].adapter.close()
        entry = None
    if entry is None:
        entry = [_new_client(config, token, resend), now, now]
    entry[2] = now
    clients[key] = entry
    while len(clients) > KEEP_CLIENTS:
        clients.pop(next(iter(clients)))[0].adapter.close()
    return entry[0]


# After a 429 (the quota answers before the request's handler): what the call's error goes on to say.
NOT_ACTED = "Vault did not act on it; try again later"
NOT_CREATED = "nothing was created; try again later"  # an operator's create (bootstrap), a rotation, a login
MOUNT_RETRIED = "nothing was created; the kubelet retries the mount"  # a mint for a volume


def _created(volume) -> str:
    return MOUNT_RETRIED if volume else NOT_CREATED


class Vault:
    """One authenticated client; plain dicts in and out."""

    def __init__(self, config: Config, token: str | None):
        if config.skip_verify and not config.allow_insecure:
            # Unverified TLS hands the generator token to whoever sits on the path.
            raise DriverError(
                "VAULT_SKIP_VERIFY is set: vaulttmpfs will not send tokens over TLS it cannot verify; "
                "give it Vault's CA with VAULT_CACERT or VAULT_CAPATH, or set VAULTTMPFS_ALLOW_INSECURE=true "
                "to accept the risk"
            )
        _check_files(config)
        self.config = config
        self.token = token

    @property
    def client(self):
        """The client for idempotent calls (lookups, renewals, revocations): resent on a 5xx."""
        return _warm_client(self.config, self.token, resend=True)

    @property
    def minting(self):
        """The client for calls that create a token: never resent once they may have reached Vault."""
        return _warm_client(self.config, self.token, resend=False)

    @contextlib.contextmanager
    def _call(self, action: str, ask_active: str | None = None, then: str = NOT_ACTED) -> Iterator[None]:
        """`then`: what a 429 past the deadline leaves, for whoever reads it (a mint: the kubelet retries)."""
        # Every attempt may take the full timeout; one more for connects and backoff. Waits after a 429
        # and for a slot in the node's write budget come out of the same deadline.
        deadline = self.config.timeout * (self.config.max_retries + 2)
        started, ok = time.monotonic(), False
        _calling.deadline, _calling.action, _calling.throttled, _calling.waited = started + deadline, action, 0, 0.0
        _calling.redirected, _calling.index, _calling.ask_active = False, None, ask_active
        try:
            with translate_errors(action, self.config.vault_addr, deadline):
                yield
            ok = True
        except VaultRateLimited as exc:
            raise VaultRateLimited(
                f"{exc} -- still over the quota after {_calling.throttled} retries ({_calling.waited:.1f}s of "
                f"backing off) within this call's {deadline:g}s deadline; {then}") from None
        finally:
            _calling.deadline = None
            telemetry.vault_call(action, time.monotonic() - started, ok)

    def create_wrapped_token(
        self, role: str, policies: list[str], metadata: dict[str, str], display_name: str,
        volume: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a token against `role`; only the response-wrapping token comes back."""
        action = f"creating a token with role {role!r} for policies {','.join(policies)}"
        with self._call(action, then=_created(volume)):
            response = self.minting.auth.token.create(
                role_name=role,
                policies=policies,
                meta=metadata,
                display_name=display_name,
                wrap_ttl=self.config.wrap_ttl,
            )
        return _wrap_info(f"creating a token with role {role!r}", response)

    def login_jwt_wrapped(self, mount: str, role: str, jwt: str,
                          volume: tuple[str, str] | None = None) -> dict[str, Any]:
        """Log in AS THE POD with its service-account JWT (POST auth/<mount>/login, Vault's jwt or
        kubernetes method): Vault's role decides the policies; only the wrapping token comes back."""
        action = f"logging in with the pod's service-account token at auth/{mount} (role {role!r})"
        with self._call(action, then=_created(volume)):
            response = self.minting.adapter.post(f"/v1/auth/{mount}/login", json={"role": role, "jwt": jwt},
                                                 wrap_ttl=self.config.wrap_ttl)
        return _wrap_info(action, response)

    def revoke_accessor(self, accessor: str) -> bool:
        """Revoke by accessor; False when the token is already gone (that is fine).

        "Gone" is only believed from the active node. An OpenBao (>= 2.5) standby answers a
        revoke-accessor itself when its copy of storage has no such token: it never reaches the write
        that would make it forward. A standby that has not yet applied the create (just unsealed,
        catching up) then answers "no token found" for a live token. So a "gone" answer that came with
        an X-Vault-Index (a Raft cluster) is asked once more of the active node."""
        revoked = self._revoke_accessor(accessor)
        if not revoked and (index := self._cluster_index()):
            revoked = self._revoke_accessor(accessor, ask_active=index)
        return revoked

    def revoke_accessors(self, accessors: list[str]) -> list[bool | DriverError]:
        """revoke_accessor for each in turn: its answer, or the DriverError it raised (the rest still go)."""
        answers: list[bool | DriverError] = []
        for accessor in accessors:
            try:
                answers.append(self.revoke_accessor(accessor))
            except DriverError as exc:
                answers.append(exc)
        return answers

    def _cluster_index(self) -> str | None:
        """The X-Vault-Index of the last answer, else of a lookup-self's: a Raft cluster's answers carry
        one, its errors (400 "token not found") do not. None: not a Raft cluster (HashiCorp Vault's open
        source standbys answer nothing themselves). When the lookup fails, so does the call: "gone" is
        not believed unasked (a revocation is then queued and retried)."""
        if _calling.index:
            return _calling.index
        self.lookup_self("this client's token (for the cluster's X-Vault-Index, before believing 'not found')")
        return _calling.index

    def _revoke_accessor(self, accessor: str, ask_active: str | None = None) -> bool:
        try:
            with self._call("revoking the pod token", ask_active):
                return _revoked(self.client.auth.token.revoke_accessor(accessor), self.config.vault_addr)
        except VaultDenied as exc:
            # HashiCorp Vault answers 400 "invalid accessor" for a token that expired or was revoked;
            # 400 "token not found": the accessor's entry is there but not the token's (revoked meanwhile,
            # or a standby that has applied one write of the create and not yet the other).
            if "invalid accessor" in str(exc).lower() or "token not found" in str(exc).lower():
                return False
            raise

    def lookup_accessor(self, accessor: str) -> dict[str, Any] | None:
        """A token's properties by accessor (never the token itself); None when Vault no longer has it
        (asked of the active node too before it is believed: see revoke_accessor)."""
        found = self._lookup_accessor(accessor)
        if found is None and (index := self._cluster_index()):
            found = self._lookup_accessor(accessor, ask_active=index)
        return found

    def _lookup_accessor(self, accessor: str, ask_active: str | None = None) -> dict[str, Any] | None:
        try:
            with self._call("looking up a pod token by accessor", ask_active):
                return self.client.auth.token.lookup_accessor(accessor)["data"]
        except VaultDenied as exc:
            if "invalid accessor" in str(exc).lower():  # expired or revoked
                return None
            raise

    def lookup_self(self, what: str = "the generator token") -> dict[str, Any]:
        with self._call(f"looking up {what}"):
            return self.client.auth.token.lookup_self()["data"]

    def renew_self(self, increment: str | None = None, what: str = "the generator token") -> dict[str, Any]:
        with self._call(f"renewing {what}"):
            return self.client.auth.token.renew_self(increment=increment)["auth"]

    def health(self) -> dict[str, Any]:
        """sys/health (no token needed): initialized, sealed, version."""
        with self._call("reading sys/health"):
            answer = self.client.sys.read_health_status(method="GET")
        return answer if isinstance(answer, dict) else {}

    def jwt_login(self, role: str, jwt: str, mount: str = "jwt") -> dict[str, Any]:
        """auth/<mount>/login with a JWT (Vault's jwt and kubernetes auth take the same body)."""
        with self._call(f"logging in with a service-account JWT as role {role!r} (auth/{mount})", then=NOT_CREATED):
            return self.minting.auth.jwt.jwt_login(role=role, jwt=jwt, use_token=False, path=mount)["auth"]

    # --- for `vaulttmpfs bootstrap` ---
    def ldap_login(self, username: str, password: str, mount: str = "ldap") -> dict[str, Any]:
        """Log in with Vault's LDAP auth method; this client then carries the login token."""
        action = f"logging in as LDAP user {username!r} (auth/{mount})"
        try:
            with self._call(action, then=NOT_CREATED):
                auth = self.minting.auth.ldap.login(username=username, password=password, mount_point=mount)["auth"]
        except VaultDenied as exc:
            raise VaultDenied(_ldap_problem(str(exc), action, mount, self.config.vault_addr)) from None
        self.token = auth["client_token"]  # from now on this object's clients carry the login token
        return auth

    def create_token(self, role: str, policies: list[str], metadata: dict[str, str],
                     display_name: str, volume: tuple[str, str] | None = None) -> dict[str, Any]:
        """Create a token against `role` and return its auth block (client_token, accessor, ...)."""
        action = f"creating a token with role {role!r} for policies {','.join(policies)}"
        with self._call(action, then=_created(volume)):
            return self.minting.auth.token.create(
                role_name=role, policies=policies, meta=metadata, display_name=display_name
            )["auth"]

    def revoke_self(self, what: str = "the login token") -> None:
        with self._call(f"revoking {what}"):
            self.client.auth.token.revoke_self()

    # --- for `vaulttmpfs token` (the pod's side) ---
    def unwrap_self(self) -> dict[str, Any]:
        """sys/wrapping/unwrap with this client's token as the wrapping token: the wrapped response.

        Single use, so never resent once it may have reached Vault (as a create is not)."""
        with self._call("unwrapping the volume's token"):
            return self.minting.sys.unwrap()

    def read_policy(self, name: str) -> str | None:
        """An ACL policy's text, None when there is no such policy."""
        import hvac.exceptions as hexc

        with self._call(f"reading policy {name!r}"):
            try:
                return self.client.sys.read_acl_policy(name)["data"]["policy"]
            except hexc.InvalidPath:
                return None

    def write_policy(self, name: str, text: str) -> None:
        with self._call(f"writing policy {name!r}"):
            self.client.sys.create_or_update_acl_policy(name, text)

    def read_token_role(self, name: str) -> dict[str, Any] | None:
        import hvac.exceptions as hexc

        with self._call(f"reading token role {name!r}"):
            try:
                return self.client.auth.token.read_role(name)["data"]
            except hexc.InvalidPath:
                return None

    def write_token_role(self, name: str, params: dict[str, Any]) -> None:
        # hvac's create_or_update_role knows only some of the role's fields: post them as they are.
        from hvac import utils

        with self._call(f"writing token role {name!r}"):
            self.client.adapter.post(utils.format_url("/v1/auth/token/roles/{name}", name=name), json=params)


def _revoked(response, addr: str) -> bool:
    """A revoke-accessor's answer: True when Vault revoked (204), False when it had no such token (OpenBao:
    200 with a "no token found" warning). Any other 2xx is not Vault's (a gateway answering for it, its
    page or its `{}`): the token may be alive, so the revocation is queued and retried, never believed."""
    if isinstance(response, dict) and "request_id" in response:  # every answer of Vault's own carries one
        return not any("no token found" in str(w).lower() for w in response.get("warnings") or [])
    if getattr(response, "status_code", None) == 204:  # hvac hands back a 204 as its Response
        return True
    status = getattr(response, "status_code", 200)
    raise VaultUnavailable(f"revoking the pod token: {addr} answered HTTP {status} with a body that is not "
                           "Vault's (a gateway answering for it?); the token may still be alive")


def _wrap_info(action: str, response) -> dict[str, Any]:
    """The wrap_info of an answer that must be wrapped; a plain token in its place is TokenNotWrapped."""
    response = response if isinstance(response, dict) else {}
    wrap_info = response.get("wrap_info")
    if wrap_info and wrap_info.get("token") and wrap_info.get("wrapped_accessor"):
        return wrap_info
    auth = response.get("auth") if isinstance(response.get("auth"), dict) else {}
    log.secret(auth.get("client_token"))  # a live token in our hands: never into a log line
    what = "a plain token instead of a wrapped one" if auth.get("client_token") else "no wrapped token"
    raise TokenNotWrapped(f"{action}: Vault returned {what} (is a proxy stripping the X-Vault-Wrap-TTL header?)",
                          auth.get("accessor"))


def _ldap_problem(error: str, action: str, mount: str, addr: str) -> str:
    """Vault's LDAP login errors, said so an operator knows what to fix."""
    text = error.lower()
    if "failed to bind as user" in text or "invalid credentials" in text or "user bind dn" in text:
        return f"{action}: wrong username or password"
    if "zero length" in text:
        return f"{action}: the password is empty"
    # Login paths need no token, so "permission denied" there means nothing is mounted.
    if "permission denied" in text or "no handler for route" in text or "404" in text:
        return (f"{action}: LDAP auth is not enabled at auth/{mount} on {addr} "
                f"(enable it with `bao auth enable -path={mount} ldap`, or name the mount with --ldap-mount)")
    return error
