"""The fork hazard behind worker/reaper.py's fork guard, shown: a process forked while another of its threads holds a
lock starts with that lock held forever. Here the lock is a module's import lock (one kind a reaper sweep can hold);
the child imports the same module, with a 5 s alarm.

    python bench/fork_hazard.py      # prints one JSON line per case: the child's exit code (-14: killed by its alarm)

Cases: ``unguarded`` (the thread imports while the main thread forks), ``guarded`` (the import runs under the
reaper's sweep lock with ``install_fork_guard`` installed, as a sweep does: the fork waits for it)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path


def fork_during_import(module: str, guarded: bool) -> int:
    from worker import reaper

    def importer():
        if guarded:
            with reaper._SWEEPING:
                __import__(module)
        else:
            __import__(module)

    thread = threading.Thread(target=importer)
    thread.start()
    time.sleep(0.5)  # the import (2 s) is under way
    pid = os.fork()
    if pid == 0:
        import signal

        signal.alarm(5)
        __import__(module)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    thread.join()
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    folder = Path(tempfile.mkdtemp())
    for name in ("slow_unguarded", "slow_guarded"):
        (folder / f"{name}.py").write_text("import time\ntime.sleep(2)\n")
    sys.path.insert(0, str(folder))
    from worker import reaper

    print(json.dumps({"case": "unguarded", "python": sys.version.split()[0],
                      "child_exit": fork_during_import("slow_unguarded", guarded=False)}), flush=True)
    reaper.install_fork_guard()
    print(json.dumps({"case": "guarded", "python": sys.version.split()[0],
                      "child_exit": fork_during_import("slow_guarded", guarded=True)}), flush=True)


if __name__ == "__main__":
    main()
