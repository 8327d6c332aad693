"""One writer per training workdir: `hold_workdir(workdir)` for the span of a run.

Process 0 takes an exclusive `flock` on WORKDIR/train.lock (without waiting) and writes who
holds it (pid, host, start time) into the file; every process of the run learns whether it
got it. A second run on the same workdir raises `WorkdirError` naming the holder. The kernel
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
from typing import BinaryIO

from longlora_jax.errors import UserError
from longlora_jax.parallel.distributed import any_process, is_main_process

LOCK_FILE = "train.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WorkdirError(UserError):
    """The workdir cannot be taken: another run holds it, or it cannot be written."""


def _holder(handle: BinaryIO) -> str:
    handle.seek(0)
    try:
        who = json.loads(handle.read() or b"{}")
    except json.JSONDecodeError:
        who = {}
    if not who:
        return "another process (it has not written its details yet)"
    return f"pid {who.get('pid')} on host {who.get('host')} since {who.get('since')}"


def _take(workdir: pathlib.Path) -> tuple[BinaryIO | None, str]:
    """(open handle holding the flock, "") or (None, why the workdir is refused); (None, "")
    where the file system has no locks."""
    path = workdir / LOCK_FILE
    unwritable = f"cannot write to workdir {workdir} ({{}}); use a writable --workdir"
    try:
        # unbuffered: a failed write (a full disk) leaves nothing for close() to retry
        handle = open(path, "a+b", buffering=0)  # noqa: SIM115 (open while the lock is held)
    except OSError as err:
        return None, unwritable.format(err.strerror)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        return None, (f"workdir {workdir} is in use by another train run: {holder}; wait for it "
                      "to end or use another --workdir")
    except OSError as err:
        handle.close()
        if err.errno not in _NO_LOCKS:
            raise
        print(f"warning: cannot lock {path} ({err.strerror}); a second train run on this "
              "workdir would not be refused", flush=True)
        return None, ""
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": since}).encode())
    except OSError as err:  # a full disk
        handle.close()
        return None, unwritable.format(err.strerror)
    return handle, ""


@contextlib.contextmanager
def hold_workdir(workdir: pathlib.Path) -> Iterator[None]:
    """Holds `workdir` for this run for the with-block (every process of the run calls it).

    Raises WorkdirError on every process when another run holds it or it cannot be written.
    """
    handle, refused = _take(workdir) if is_main_process() else (None, "")
    try:
        if any_process(bool(refused)):
            raise WorkdirError(refused or f"process 0 could not take workdir {workdir} (see its "
                               "error)")
        yield
    finally:
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
