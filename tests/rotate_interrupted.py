"""Runs `vaulttmpfs rotate ARGS...` (the real entry) and sends itself SIGNAL (KILL: a kill -9; STOP: paused
until the test sends SIGCONT) just before its STEP-th change of the node (0-based): a queue entry written or
dropped, the volume's record written, a file of the volume written (tests/test_rotate.py's STEPS, in order).
SIGNAL FAIL: that change fails instead, as a full disk fails it (OSError ENOSPC), and the rotation goes on.
NEW_TOKEN_GRACE replaces the wait a rotation's new tokens are queued with (300 s), for a test that cannot wait.

    python tests/rotate_interrupted.py STEP SIGNAL NEW_TOKEN_GRACE ARGS...
"""

import errno
import os
import signal
import sys

from vaulttmpfs.engine import rotate, state, volume
from vaulttmpfs.entry import main

step, sig = int(sys.argv[1]), None if sys.argv[2] == "FAIL" else getattr(signal, "SIG" + sys.argv[2])
rotate.NEW_TOKEN_GRACE = float(sys.argv[3])
changes = 0


def interrupted_before(change):
    def changing(*args, **kwargs):
        global changes
        changes += 1
        if changes - 1 == step:
            if sig is None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), sig)
        return change(*args, **kwargs)

    return changing


for owner, name in ((state.StateStore, "add_pending"), (state.StateStore, "write_volume"),
                    (state.StateStore, "drop_pending"), (volume, "write_file")):
    setattr(owner, name, interrupted_before(getattr(owner, name)))
sys.argv = ["vaulttmpfs", "rotate", *sys.argv[4:]]
raise SystemExit(main())
