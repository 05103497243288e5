"""Files a run writes and reads back: atomic writes, and checkpoints that are only data.

Atomic: every file is written beside its final name and then renamed over it, so a
reader (a resumed run, Prometheus' file discovery, a parallel data worker) sees the old
file or the new one, never half of one -- also when the writer is killed mid-write.

Data: a checkpoint is loaded with `torch.load(weights_only=True)`, PyTorch's restricted
unpickler, which builds tensors and plain containers and refuses everything else.  On a
cluster, run directories live on shared storage; an unrestricted unpickler would run
whatever code a file there names, on every node, at the next `--resume` or actor
recovery.  So what localnet saves is tensors, numbers, strings and plain containers
only, and a file holding anything else is refused before any of it runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded as plain data (nothing from it ran)."""


class RunInUseError(RuntimeError):
    """A run directory another live process is training in."""


LOCK = "run.lock"


def first_few(names: list[str], n: int = 4) -> str:
    """The first n of names, then how many more: a line a terminal holds."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def counted(n: int, noun: str) -> str:
    """'1 micro-batch', '4 micro-batches': a count in a title or a line ('2 epochs': a
    hard 'ch' takes a plain s)."""
    es = noun.endswith(("s", "x", "sh", "tch"))
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if es else 's'}"


@contextmanager
def run_lock(run_dir, what: str = "run", then: str | None = None):
    """Hold `run_dir` for this process's run (or sweep).  Two runs in one directory (a
    `--resume` of a run still going in another terminal, a sweep started twice) would
    write their checkpoints over each other's and each truncate the other's logs, so the
    second is refused, naming the first; `then` says how to go on once it is free.  An
    advisory flock: the kernel drops it when its holder dies, even by kill -9, so a
    crashed run never leaves its directory held."""
    path = Path(run_dir) / LOCK
    fd = _lock(path, f"{run_dir} is in use by another localnet {what} (HOLDER): a "
                     f"{what} directory takes one at a time.  Wait for that one to end, or "
                     f"stop it (Ctrl-C, or kill its pid) and "
                     f"{then or f'go on with: localnet run --resume {run_dir}'}")
    if fd is None:  # a filesystem without locks (ENOLCK): run unguarded
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a run directory keeps no lock file
        os.close(fd)


def _lock(path: Path, busy: str) -> int | None:
    """The held lock file's descriptor; None where the filesystem has no locks or the
    file cannot be made (the run's own writes then say what is wrong there)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process"
            os.close(fd)
            # replace, not format: a directory's name may hold braces
            raise RunInUseError(busy.replace("(HOLDER)", f"({holder})", 1)) from None
        except OSError:
            os.close(fd)
            return None
        try:  # the holder before us removed the file we opened: lock the one there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


_HOLDER = re.compile(r"pid (\d+) on (\S+), since (.+)")


def lock_holder(run_dir) -> dict | None:
    """Who holds `run_dir`, read without taking its lock -- a reader that took it, even
    for a moment, could make a run starting there fail as in use.  None where no lock
    file is left (no run there, or it ended and removed it); else {"pid", "host",
    "since", "alive"}: alive is True or False on the holder's own host, and None on
    another host, whose processes this one cannot see (or when the holder is just
    ending).  A lock file whose holder is gone is what kill -9, the out-of-memory killer
    or a lost machine leaves."""
    try:
        text = (Path(run_dir) / LOCK).read_text(errors="replace").strip()
    except OSError:
        return None
    m = _HOLDER.fullmatch(text)
    if m is None:  # opened, not yet written (its holder is starting up): unknown
        return {"pid": None, "host": None, "since": None, "alive": None}
    pid, host = int(m[1]), m[2]
    alive = _holds(Path(run_dir) / LOCK, pid) if host == socket.gethostname() else None
    return {"pid": pid, "host": host, "since": m[3], "alive": alive}


def _holds(path: Path, pid: int) -> bool | None:
    """Whether process `pid` holds the flock on `path`: Linux lists every lock with its
    holder's pid and the file's inode in /proc/locks (a pid reused since by another
    process holds no lock there).  Elsewhere, whether that pid is alive.  None if the
    file went just now: its holder ended as it should."""
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        return None
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            pass
        return True
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 12079 fe:00:2318702 0 EOF"
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[4] == str(pid) \
                and f[5].rsplit(":", 1)[-1] == str(ino):
            return True
    return False


def atomic_write(path, write) -> None:
    """write(tmp) a file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # per process: no two writers share it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path, doc, indent: int | None = 1) -> None:
    write_text(path, json.dumps(doc, indent=indent) + "\n")


def save_state(state, path) -> None:
    """torch.save, atomically.  `state` must be data (see load_state)."""
    import torch  # here: the modules that only write json need no torch

    try:
        atomic_write(path, lambda p: torch.save(state, p))
    except RuntimeError as err:  # torch's writer reports a short write as "unexpected pos"
        raise _unwritable(path, str(err).splitlines()[0], full=True) from None
    except OSError as err:
        raise _unwritable(path, err.strerror or str(err),
                          full=err.errno in (errno.ENOSPC, errno.EDQUOT)) from None


class UnwritableError(OSError):
    """A state file that could not be written: `path`, and `why`."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"cannot write {path} ({why}).  The file it would have replaced, "
                         f"if any, is unchanged")
        self.path, self.why = path, why

    def __reduce__(self):  # leaves an actor through Ray's pickling
        return (type(self), (self.path, self.why))


def _unwritable(path, why: str, full: bool) -> UnwritableError:
    """A state file that could not be written; for a short write, what a user checks
    first: the free space where it goes.  The file it would have replaced is untouched
    (atomic_write)."""
    path = Path(path)
    if full:
        try:
            why += f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MB free there: a " \
                   f"full disk or quota?"
        except OSError:
            pass
    return UnwritableError(path, why)


def load_state(path, what: str = "checkpoint"):
    """A file written by save_state, on the CPU, through the restricted unpickler.
    Anything but tensors and plain containers is refused with CheckpointError, naming
    the file and what it tried to load; nothing from the file runs."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's text advises how to allow the object; keep only what it was
        m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\. Please|\n|$)",
                      str(err))
        reason = m.group(1) if m else str(err).splitlines()[0]
        raise CheckpointError(f"{what} {path} is refused: it holds more than tensors and plain "
                              f"data, so loading it could run code ({reason}).  Nothing from it "
                              f"was loaded; was it written by localnet?") from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CheckpointError(f"{what} {path} cannot be read ({str(err).splitlines()[0]}); "
                              f"it is truncated or not a torch file") from None
