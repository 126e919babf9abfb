"""`make demo`: the whole flow, kubelet-style, against a throwaway OpenBao dev server.

init -> mount -> the files in the tmpfs -> unwrap (policies + pod metadata) -> unmount ->
the token is revoked. Needs root, or a user namespace mapping the ids it uses (make runs it
through tests/userns.sh when not root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import idmap
from tests.vaultserver import VaultServer


def styled(text: str, sgr: str) -> str:
    """`text` in bold/colour on a terminal; plain in a log or a pipe."""
    return f"\033[{sgr}m{text}\033[0m" if sys.stdout.isatty() else text


def step(title: str) -> None:
    print("\n" + styled(f"== {title}", "1"), flush=True)


def masked(value: str) -> str:
    return value[:6] + "…" if value else value


def driver_command() -> list[str]:
    found = shutil.which("vaulttmpfs", path=os.path.dirname(sys.executable)) or shutil.which("vaulttmpfs")
    return [found] if found else [sys.executable, "-m", "vaulttmpfs"]


def call(cmd: list[str], env: dict[str, str], *args: str) -> dict:
    shown = " ".join([Path(cmd[-1]).name, *[a if len(a) < 60 else a[:57] + "..." for a in args]])
    print(f"$ {shown}")
    proc = subprocess.run([*cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env)
    reply = json.loads(proc.stdout)  # the kubelet's view: one JSON object, stdout+stderr
    print(f"  exit {proc.returncode}: {json.dumps(reply)}")
    return reply


def main() -> int:
    if why := idmap.problem():
        print(f"the demo cannot run here: {why}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="vaulttmpfs-demo-"))
    cmd = driver_command()
    with VaultServer() as bao:
        step(f"OpenBao dev server at {bao.addr}; policy `nginx`, role `applications`, generator policy")
        bao.setup_driver(allowed=("nginx",))
        generator = bao.generator_token(ttl="1h")
        token_path = work / "etc/kubernetes/vaulttoken"
        token_path.parent.mkdir(parents=True, mode=0o700)
        token_path.write_text(generator["client_token"] + "\n")
        token_path.chmod(0o600)
        print(f"generator token (policy token_generator) written to {token_path} (0600)")

        env = {"PATH": os.environ["PATH"], "VAULT_ADDR": bao.addr,
               "VAULTTMPFS_GENERATOR_TOKEN_PATH": str(token_path),
               "VAULTTMPFS_STATE_DIR": str(work / "var/lib/vaulttmpfs"),
               "VAULTTMPFS_LOG_FILE": str(work / "var/log/vaulttmpfs.log"),
               "VAULTTMPFS_PODS_DIR": str(work / "var/lib/kubelet/pods"),
               # Not the machine's: in a plain user's namespace the host's /etc is not root's (it shows as
               # nobody's), and the driver refuses a config path through an untrusted directory.
               "VAULTTMPFS_CONFIG_FILE": str(work / "etc/vaulttmpfs/config.env")}
        pod_uid = str(uuid.uuid4())
        volume = work / f"var/lib/kubelet/pods/{pod_uid}/volumes/cloudwatt~vaulttmpfs/vault"
        volume.mkdir(parents=True, mode=0o750)
        options = {"kubernetes.io/fsType": "tmpfs", "kubernetes.io/readwrite": "rw",
                   "kubernetes.io/pod.name": "nginx", "kubernetes.io/pod.namespace": "demo",
                   "kubernetes.io/pod.uid": pod_uid, "kubernetes.io/serviceAccount.name": "default",
                   "kubernetes.io/pvOrVolumeName": "vault", "kubernetes.io/mounterArgs.FsGroup": "1000",
                   "vault/policies": "nginx"}

        step("kubelet: init")
        call(cmd, env, "init")
        step("kubelet: mount (pod demo/nginx, options {vault/policies: nginx})")
        if call(cmd, env, "mount", str(volume), json.dumps(options, separators=(",", ":")))["status"] != "Success":
            return 1
        step("the pod's volume: a tmpfs with the wrapped token and its metadata")
        print(subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", str(volume)],
                             capture_output=True, text=True).stdout.strip())
        print(subprocess.run(["ls", "-ln", str(volume)], capture_output=True, text=True).stdout.strip())
        wrap_info = json.loads((volume / "vault-token.json").read_text())
        print(json.dumps({**wrap_info, "token": masked(wrap_info["token"])}, indent=2))

        step("the pod unwraps its token (once) and sees its policies and metadata")
        auth = bao.unwrap((volume / "vault-token").read_text())["auth"]
        print(json.dumps({"policies": auth["policies"], "metadata": auth["metadata"],
                          "ttl": auth["lease_duration"], "renewable": auth["renewable"],
                          "client_token": masked(auth["client_token"])}, indent=2))

        step("kubelet: mount again (kubelet restart): idempotent, nothing minted")
        call(cmd, env, "mount", str(volume), json.dumps(options))
        step("kubelet: unmount (pod deleted)")
        call(cmd, env, "unmount", str(volume))
        alive = bao.lookup_accessor(auth["accessor"]) is not None
        mounted = os.path.ismount(volume)
        print(f"token {auth['accessor']}: {'STILL ALIVE' if alive else 'revoked'}; volume mounted: {mounted}")
        bao.revoke_token(generator["client_token"])
        step(f"driver log: {env['VAULTTMPFS_LOG_FILE']} (JSON lines, no token values)")
        print(Path(env["VAULTTMPFS_LOG_FILE"]).read_text().strip())
    if not mounted:
        shutil.rmtree(work, ignore_errors=True)
    step("OpenBao stopped")
    if alive or mounted:
        print(styled(f"DEMO FAILED: the pod's token is {'still alive' if alive else 'revoked'}, "
                     f"its tmpfs is {'still mounted' if mounted else 'gone'}", "1;31"))
        return 1
    print(styled("DEMO OK: the pod's token was minted on mount and revoked on unmount; its tmpfs is gone.", "1;32"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
