"""A message's payload through shared memory, between processes on one machine.

Ray hands a payload from one actor to the next either inline, through the driver (up to
`runtime.local_inline_bytes`), or through its object store.  Both cost the machine CPU
in Ray's own threads, which on a small machine the actors' compute competes with.  A
file in /dev/shm (memory, not disk) that the sender writes and the receiver reads and
deletes costs a copy at each end and a few system calls (figures in
benchmarks/RESULTS.md, from `python benchmarks/pipeline_probe.py hop`).

So on the embedded local Ray -- one machine, by construction -- a message whose payload
has at least `runtime.local_shm_bytes` bytes and exactly one receiver travels that way:
the header still goes through Ray in the call's arguments, with the file's name in its
meta ("shm"), and the payload slot carries an empty array.  The receiver reads the file
into a fresh array, checks its size against the header, and deletes it; the message is
then validated like any other.  What crosses is unchanged -- the same activation or
error, counted by the ledger with the same payload bytes -- only the medium differs.

Every file's name holds the run and the writer's pid: the coordinator deletes what a
failed step left unread (`sweep`), and, when it starts, what processes that are gone
left behind (`sweep_orphans`: a killed run, a crashed actor).
"""

from __future__ import annotations

import itertools
import math
import os
import re

import numpy as np

ROOT = "/dev/shm"
_PREFIX = "localnet-"
_counter = itertools.count()


def available() -> bool:
    """True when this machine has a writable /dev/shm (Linux)."""
    return os.path.isdir(ROOT) and os.access(ROOT, os.W_OK)


def prefix(run: str) -> str:
    return _PREFIX + re.sub(r"[^A-Za-z0-9_.]", "_", run) + "-"


def put(arr: np.ndarray, run: str) -> str:
    """Write a C-contiguous array to a new file; returns the file's name."""
    name = f"{prefix(run)}{os.getpid()}-{next(_counter)}"
    view = memoryview(arr).cast("B")
    path = os.path.join(ROOT, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    except BaseException:
        os.unlink(path)  # e.g. /dev/shm full (a container's 64 MiB): leave nothing behind
        raise
    finally:
        os.close(fd)
    return name


def take(name, dtype: str, shape) -> np.ndarray:
    """Read the payload `name` as an array of `dtype` and `shape`, and delete the file.
    Raises ValueError (the reason) when the name is not one of ours, the file is gone,
    or its size is not what the header says."""
    if not isinstance(name, str) or not name.startswith(_PREFIX) or "/" in name or ".." in name:
        raise ValueError(f"shared-memory payload name {name!r} is not one of localnet's")
    try:
        dt = np.dtype(dtype)
        want = math.prod(int(n) for n in shape) * dt.itemsize
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shared-memory payload of dtype {dtype!r} shape {list(shape)}: {exc}") \
            from None
    path = os.path.join(ROOT, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ValueError(f"shared-memory payload {name} does not exist (already read, or "
                         f"swept after a failed step)") from None
    try:
        size = os.fstat(fd).st_size
        if size != want:
            raise ValueError(f"shared-memory payload {name} has {size} bytes, its header "
                             f"says {want}")
        arr = np.empty(tuple(int(n) for n in shape), dt)
        view, done = memoryview(arr).cast("B"), 0
        while done < want:
            n = os.readv(fd, [view[done:]])
            if n == 0:
                raise ValueError(f"shared-memory payload {name} ended after {done} bytes")
            done += n
    finally:
        os.close(fd)
        os.unlink(path)
    return arr


def sweep(run: str) -> int:
    """Delete every payload file of `run` still there; returns how many."""
    p = prefix(run)
    return _delete_where(lambda name: name.startswith(p))


def sweep_orphans() -> int:
    """Delete every localnet payload file whose writer process no longer exists (in
    this pid namespace: a container has its own /dev/shm, so its files are its own)."""
    def orphan(name):
        m = re.fullmatch(re.escape(_PREFIX) + r".*-(\d+)-\d+", name)
        return m is not None and not _alive(int(m.group(1)))
    return _delete_where(orphan)


def _delete_where(pick) -> int:
    if not available():
        return 0
    n = 0
    for name in os.listdir(ROOT):
        if pick(name):
            try:
                os.unlink(os.path.join(ROOT, name))
                n += 1
            except FileNotFoundError:
                pass
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
