"""Peak memory of one process, without what it inherited from the process that started it.

`getrusage().ru_maxrss` (and `os.wait4`'s) survives fork and exec on Linux: a child started by a
bench process that holds 1 GiB reports a 1 GiB peak before it allocates anything (measured: a
fresh `python -c` started from a 1 GiB parent reads ru_maxrss 1037 MiB, VmHWM 13 MiB). Our
benches build their inputs in the bench process and then start the launcher and the dask
workers from it, so their peaks were the bench's own size. VmHWM in /proc/<pid>/status is the
high-water mark of the process's current address space, which exec replaces.

As a script it runs the vlforge command line and, when the command is done, writes the process's
VmHWM (KiB) to a file:

    python bench/peak_memory.py REPORT_FILE mine --in ... --out ...
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def peak_kib() -> int:
    """This process's peak resident memory in KiB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def read_report(path: Path) -> int:
    """The KiB a run of this script wrote to `path`."""
    return int(path.read_text())


def main() -> None:
    from vlforge.cli import main as vlforge_main

    report, *args = sys.argv[1:]
    code = 1
    try:
        code = vlforge_main(args)
    finally:
        Path(report).write_text(str(peak_kib()))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)  # as vlforge.cli.entry does (its docstring says why)


if __name__ == "__main__":
    main()
