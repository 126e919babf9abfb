"""Runs last (file name): after the whole suite, no token value is in any log or state file the
driver wrote, and the session's OpenBao holds no token vaulttmpfs minted for a pod."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import SEEN_SECRETS

# OpenBao / Vault token shapes: s./b./r. + 24 characters, and HashiCorp's hvs./hvb./hvr. tokens.
TOKEN_SHAPE = re.compile(rb"(?<![A-Za-z0-9])(?:[sbr]\.[A-Za-z0-9]{24}|hv[sbr]\.[A-Za-z0-9_-]{24,})(?![A-Za-z0-9])")


def written_files(log_dir: Path, basetemp: Path) -> list[Path]:
    """The driver's logs (every test logs into log_dir or a *.log of its own) and its state dirs."""
    files = {p for p in log_dir.rglob("*") if p.is_file()}
    files |= {p for p in basetemp.rglob("*.log") if p.is_file()}
    files |= {p for state in basetemp.rglob("state") if state.is_dir() for p in state.rglob("*") if p.is_file()}
    return sorted(files)


def test_no_token_value_reached_a_log_or_state_file(log_dir, tmp_path_factory, bao):
    files = written_files(log_dir, tmp_path_factory.getbasetemp())
    secrets = [s.encode() for s in SEEN_SECRETS if len(s) >= 8]
    assert secrets, "the suite remembered no token values: this check would prove nothing"
    found = []
    for path in files:
        data = path.read_bytes()
        found += [f"{path}: a token the tests saw" for s in secrets if s in data]
        found += [f"{path}: {m.group()[:4]}... (token-shaped)" for m in TOKEN_SHAPE.finditer(data)]
    assert found == []


def test_no_pod_token_is_left_alive_in_vault(bao):
    alive = []
    for accessor in bao.accessors():
        info = bao.lookup_accessor(accessor)
        if not info:
            continue
        if (info.get("meta") or {}).get("created_by") == "vaulttmpfs":
            alive.append(f"pod token {accessor}: {info['meta']}")
        elif info.get("policies") == ["response-wrapping"]:
            alive.append(f"wrapping token {accessor} for {info.get('path')}")
    assert alive == []
