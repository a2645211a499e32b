"""What every child process of the service does first (no torch): the tensor-parallel workers
(engine/distributed/workers.py) and the engine process (appliance/engine_process.py).

- SIGINT, SIGTERM and SIGHUP are ignored: a signal to the whole process group (Ctrl-C, systemd's
  stop, `timeout`, a closed terminal) reaches the children too, but the main process decides:
  it drains, reloads its keys on SIGHUP, then stops its children itself.
- The child gets SIGKILL when the process that started it dies (PR_SET_PDEATHSIG, Linux), so no
  child outlives the service; and a name `top` and `ps` show.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def guard_child_process(name: str | None = None) -> None:
    """Ignore the group's signals, die with the parent; `name` (<= 15 bytes) names the process."""
    for signame in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, signame):  # no SIGHUP on Windows
            signal.signal(getattr(signal, signame), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if name is not None:
            libc.prctl(_PR_SET_NAME, name.encode()[:15])
