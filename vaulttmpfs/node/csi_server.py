"""Hosts the CSI front end in the node agent: a gRPC server on a unix socket, warm (imports, Vault
settings and state dir ready), so a publish costs what the volume costs, not an exec.

The socket is bound under a temporary name, made 0600, then renamed into place: it is never open
to anyone but root, and a stale socket left by a killed agent is replaced atomically; a live one
(another agent answering there) is left alone and the agent refuses to start.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from concurrent import futures

import grpc

from .. import log
from ..config import Config
from ..csi import csi_pb2_grpc, servicers
from ..csi.interceptor import LogAndMap
from ..errors import DriverError
from .service import Service

# Concurrent RPCs; a node's burst of pod starts queues behind these. A call is mostly Python under
# one GIL: more threads only contend for it (50 concurrent publishes took ~1.4x longer with 32).
WORKERS = 8
STOP_GRACE = 60.0  # seconds a call in flight may take to finish on stop: a half-done mount helps nobody


def socket_path(endpoint: str) -> str:
    """`unix:///csi/csi.sock` (CSI_ENDPOINT's form) or a bare absolute path -> the socket path."""
    path = endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint
    if not path.startswith("/") or "://" in path:
        raise DriverError(f"CSI endpoint {endpoint!r} must be unix:///<absolute path> (e.g. unix:///csi/csi.sock)")
    return path


class CsiServer(Service):
    """The agent's CSI node plugin."""

    name = "csi"

    def __init__(self, config: Config, endpoint: str, workers: int = WORKERS, jwt_login=None, node=None):
        self.config = config
        self.jwt_login = jwt_login  # servicers.JwtLogin: pods log in with their service-account token
        self.node = node  # the Node servicer; default servicers.Node (uninstall serves servicers.TeardownOnly)
        self.path = socket_path(endpoint)
        self.workers = workers
        self._server = None
        self._inode: int | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        _refuse_if_served(self.path)
        temp = f"{self.path}.{os.getpid()}.tmp"
        _unlink_stale(temp)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="csi"),
                             interceptors=[LogAndMap(self.config.state_dir)])
        csi_pb2_grpc.add_IdentityServicer_to_server(servicers.Identity(), server)
        csi_pb2_grpc.add_ControllerServicer_to_server(servicers.Controller(), server)
        csi_pb2_grpc.add_NodeServicer_to_server(self.node or servicers.Node(self.config, self.jwt_login), server)
        try:
            server.add_insecure_port(f"unix://{temp}")
        except RuntimeError as exc:
            raise DriverError(f"CSI server cannot listen on {self.path}: {exc}") from None
        server.start()  # the socket is bound and listening here: still under its temporary name
        try:
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)
        except OSError as exc:
            server.stop(0)
            _unlink_stale(temp)
            raise DriverError(f"CSI server cannot place its socket at {self.path}: {exc.strerror}") from None
        self._server, self._inode = server, os.stat(self.path).st_ino
        log.get(component="csi").info("csi listening", socket=self.path)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop(STOP_GRACE).wait(STOP_GRACE)
        self._stopped.set()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)  # ours; a newer agent's socket there is left alone
        except FileNotFoundError:
            pass

    def status(self) -> dict:
        return {"socket": self.path, "serving": self.alive()}

    def healthy(self) -> bool:
        return self.alive()

    def alive(self) -> bool:
        return self._server is not None and not self._stopped.is_set()


def _refuse_if_served(path: str) -> None:
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise DriverError(f"CSI socket dir {parent} does not exist (mount the kubelet's plugin dir there)")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise DriverError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError:
        return  # nobody answers: a stale socket from a previous agent, replaced by the rename
    finally:
        probe.close()
    raise DriverError(f"another process already serves {path}; refusing to take its socket")


def _unlink_stale(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
