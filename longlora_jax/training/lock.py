"""One writer per training workdir: `hold_workdir(workdir)` for the span of a run.

Process 0 takes an exclusive `flock` on WORKDIR/train.lock (without waiting) and writes who
holds it (pid, host, start time) into the file; every process of the run learns whether it
got it. A second run on the same workdir raises `WorkdirBusy` naming the holder. The kernel
drops a flock when its process dies, SIGKILL included, so a killed run never blocks the next
one; the file stays behind with the dead holder's details, which are only ever read while the
lock is held by someone else.

The lock works where the file system supports flock across the machines that share it (local
disks; NFSv4). On a FUSE mount without lock support (gcsfuse) the kernel keeps flocks
host-local: a second launch on the same host is refused, one from another host is not seen.
Where flock fails outright (ENOLCK: an NFS mount without a lock service) the run warns and
goes on unlocked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator

from longlora_jax.errors import UserError
from longlora_jax.parallel.distributed import any_process, is_main_process

LOCK_FILE = "train.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WorkdirBusy(UserError):
    """Another run holds the workdir."""


def _holder(handle) -> str:
    handle.seek(0)
    try:
        who = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        who = {}
    if not who:
        return "another process (it has not written its details yet)"
    return f"pid {who.get('pid')} on host {who.get('host')} since {who.get('since')}"


@contextlib.contextmanager
def hold_workdir(workdir: pathlib.Path) -> Iterator[None]:
    """Holds `workdir` for this run for the with-block (every process of the run calls it).

    Raises WorkdirBusy on every process when another run holds it.
    """
    path = workdir / LOCK_FILE
    handle = None
    busy = ""
    if is_main_process():
        handle = open(path, "a+")  # noqa: SIM115 (held across the with-block)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = _holder(handle)
            handle.close()
            handle = None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            print(f"warning: cannot lock {path} ({err.strerror}); a second train run on this "
                  "workdir would not be refused", flush=True)
            handle.close()
            handle = None
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": since}))
            handle.flush()
    if any_process(bool(busy)):
        raise WorkdirBusy(
            f"workdir {workdir} is in use by another train run: {busy}; wait for it to end "
            "or use another --workdir" if busy else
            f"workdir {workdir} is in use by another train run (process 0 says by whom)")
    try:
        yield
    finally:
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
