"""Runs the driver's real entry (`vaulttmpfs.entry.main`) as the kubelet's exec would, and at its
`os._exit` writes what the call did to the file named by argv[1]: the files it os.open()ed, the
modules that were loaded before the entry was imported (the interpreter's own start) and after.

    python tests/exec_probe.py OUT VERB ARGS...
"""

import os
import sys

out = sys.argv[1]
before = sorted(sys.modules)
opened: list[str] = []
real_open, real_exit = os.open, os._exit


def counting_open(path, *args, **kwargs):
    opened.append(os.fsdecode(path))
    return real_open(path, *args, **kwargs)


def dump(code: int) -> None:
    after = sorted(sys.modules)  # first: writing the report must not add to it
    with open(out, "w", encoding="utf-8") as report:
        report.write(repr({"opened": opened, "before": before, "after": after}))
    real_exit(code)


os.open = counting_open
os._exit = dump
sys.argv = ["vaulttmpfs", *sys.argv[2:]]
from vaulttmpfs.entry import main  # noqa: E402 -- after the hooks, as the exec would load it

main()
