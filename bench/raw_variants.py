"""One-off probe behind docs/vault-cluster.md (issue 20): what a raw client's create body, a new connection
per call, a CPU hog and fewer calls in flight do to Vault's CPU per pod on a 3-node Raft cluster.

    tests/userns.sh .venv/bin/python bench/raw_variants.py

Prints per variant: pods/s, publish p50 ms, Vault CPU ms per pod (270 pods each, two rounds).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import cluster as bc  # noqa: E402

from tests.raftcluster import RaftCluster  # noqa: E402

OLD_BODY = {"policies": ["nginx"], "display_name": "bench-raw"}  # the raw client's create before 3686ca0


class Raw(bc.RawClient):
    def __init__(self, *args, body=None, fresh=False):
        super().__init__(*args)
        self.fixed_body, self.fresh = body, fresh

    def body(self) -> dict:
        return self.fixed_body if self.fixed_body is not None else super().body()

    def _post(self, path, body, extra=None, gone_ok=False):
        if self.fresh and getattr(self.local, "conn", None) is not None:
            self.local.conn.close()
            self.local.conn = None
        return super()._post(path, body, extra, gone_ok)


def measure(bao, raw, pods: int, in_flight: int) -> tuple:
    pids = bc.vault_pids(bao)
    before = sum(map(bc.cpu_ms, pids))
    result = bc._drive_raw(raw, pods, in_flight)
    return result["pods_per_s"], result["publish_p50_ms"], round((sum(map(bc.cpu_ms, pids)) - before) / pods, 1)


def main() -> None:
    with RaftCluster() as cluster:
        bao = cluster.standbys()[0]
        bao.setup_driver()
        token = bao.generator_token(ttl="2h")["client_token"]
        pids = bc.vault_pids(bao)
        before = sum(map(bc.cpu_ms, pids))
        time.sleep(5)
        print("idle Vault CPU ms/s", round((sum(map(bc.cpu_ms, pids)) - before) / 5, 1), flush=True)

        def raw(**kw):
            return Raw(bao, token, "applications", "300s", **kw)

        measure(bao, raw(), 60, 12)  # warm-up
        for round_ in range(2):
            for name, client, in_flight, hog in [
                    ("old body", raw(body=OLD_BODY), 12, False), ("driver's body", raw(), 12, False),
                    ("old body, new connection per call", raw(body=OLD_BODY, fresh=True), 12, False),
                    ("old body + 1 CPU hog", raw(body=OLD_BODY), 12, True),
                    ("old body, 4 in flight", raw(body=OLD_BODY), 4, False)]:
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
                try:
                    print(round_, name, in_flight, measure(bao, client, 270, in_flight), flush=True)
                finally:
                    if burner:
                        burner.kill()
                        burner.wait()


if __name__ == "__main__":
    main()
