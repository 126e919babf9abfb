"""Tests that act as another user (`nobody`) from a checkout no one else may enter.

A clone in /root (0700 on Debian) or in any private dir, and pytest's own 0700 temp dirs, are closed
to that user: what it runs or touches goes into a dir under /tmp, whose parents every user can
enter (1777 on Debian, and in tests/userns.sh's own /). Such tests carry the `other_user` mark:
test_fresh_machine runs them again from a clone inside a 0700 dir.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

NOBODY = 65534
MARK = "other_user"
other_user = getattr(pytest.mark, MARK)


def become(uid: int = NOBODY) -> None:
    """Drop to `uid` (and the same gid, no supplementary groups): a preexec_fn, or a forked child's first step."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def shared_dir() -> Path:
    """A fresh 0700 dir that another user can reach once it is opened (not under TMPDIR: that may be
    private); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix="vaulttmpfs-shared-", dir="/tmp"))
