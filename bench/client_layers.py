"""One-off probe behind docs/vault-cluster.md and docs/performance-flexvolume.md (issues 20, 25): the CPU
one wrapped token create costs in this process through each layer of our Vault client, on one kept-alive
connection to an OpenBao dev server. What a lighter HTTP layer under hvac would save per Vault call.

    .venv/bin/python bench/client_layers.py [--calls 400] [--rounds 3]

Prints, per layer, the median over the rounds of CPU ms per create (this process only; the server's is
not counted). Layers, outermost first: vault.client.Vault (ours: deadline, errors, write budget,
telemetry), hvac.Client on a plain requests.Session, requests.Session.post, urllib3's connection pool,
http.client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

import hvac  # noqa: E402
import requests  # noqa: E402
import urllib3  # noqa: E402

from tests.vaultserver import VaultServer  # noqa: E402
from vaulttmpfs.config import Config  # noqa: E402
from vaulttmpfs.vault.client import Vault  # noqa: E402

ROLE, PATH, WRAP_TTL = "applications", "/v1/auth/token/create/applications", "60s"
BODY = {"policies": ["nginx"], "meta": {"created_by": "vaulttmpfs-bench"}, "display_name": "bench-layers"}


def layers(addr: str, token: str) -> dict:
    parts = urlsplit(addr)
    headers = {"X-Vault-Token": token, "X-Vault-Wrap-TTL": WRAP_TTL, "Content-Type": "application/json"}
    body = json.dumps(BODY)
    ours = Vault(Config().replace(vault_addr=addr), token)
    session = requests.Session()
    session.trust_env = False
    client = hvac.Client(url=addr, token=token, session=session)
    pool = urllib3.HTTPConnectionPool(parts.hostname, parts.port, maxsize=1)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def via_http_client() -> dict:
        conn.request("POST", PATH, body=body, headers=headers)
        return json.loads(conn.getresponse().read())

    return {
        "vault.client.Vault": lambda: ours.create_wrapped_token(ROLE, BODY["policies"], BODY["meta"],
                                                                BODY["display_name"]),
        "hvac": lambda: client.auth.token.create(role_name=ROLE, policies=BODY["policies"], meta=BODY["meta"],
                                                 display_name=BODY["display_name"], wrap_ttl=WRAP_TTL),
        "requests": lambda: session.post(addr + PATH, data=body, headers=headers).json(),
        "urllib3": lambda: json.loads(pool.urlopen("POST", PATH, body=body, headers=headers, retries=False,
                                                   redirect=False).data),
        "http.client": via_http_client,
    }


def cpu_ms_per_call(call, calls: int) -> float:
    for _ in range(20):  # warm: connection open, code paths hot
        call()
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) * 1000 / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="creates per layer per round [400]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, layers interleaved [3]")
    args = parser.parse_args()
    with VaultServer() as bao:
        bao.setup_driver()
        token = bao.generator_token(ttl="2h")["client_token"]
        calls = layers(bao.addr, token)
        results: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                results[name].append(cpu_ms_per_call(call, args.calls))
    inner = statistics.median(results["http.client"])
    print(f"CPU ms per wrapped create, this process, median of {args.rounds} rounds of {args.calls}:")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:20s} {median:6.3f}   (+{median - inner:.3f} over http.client)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
