"""The data plane of `runtime.executor: local`: every actor's worker in this process, the
messages between them in queues.  No Ray and no sockets, but each message still goes
through the framing and the receiver's checks (`frames.py`), so the local mode
tests the same wire contract as the real plane."""

from __future__ import annotations

from collections import deque

import numpy as np

from .payload import host as to_host, layout, wire_bytes
from .frames import as_array, frame, unframe


class LocalPlane:
    """In-process queues between the workers of one process (`executor: local`).  A
    receive never blocks: `ready` tells the coordinator's round-robin whether it can."""

    def __init__(self, names: list[str]):
        self.names = names
        self._q: dict[tuple[int, int], deque] = {}

    def endpoint(self, rank: int) -> "LocalEnd":
        return LocalEnd(self, rank)


class LocalEnd:
    def __init__(self, plane: LocalPlane, rank: int):
        self.plane, self.rank, self.names = plane, rank, plane.names

    def send(self, dst: int, raw: bytes, payload) -> None:
        # a copy, as a real plane makes: the sender may reuse its tensor
        self.plane._q.setdefault((self.rank, dst), deque()).append(
            (raw, np.array(to_host(payload))))

    def ready(self, src: int) -> bool:
        return bool(self.plane._q.get((src, self.rank)))

    def recv(self, src: int) -> tuple[bytes, np.ndarray]:
        raw, arr = self.plane._q[(src, self.rank)].popleft()
        f = frame(raw, arr.nbytes)  # the same framing checks as on the wire
        raw, nbytes, _ = unframe(f, self.names[src], self.names[self.rank])
        return raw, as_array(raw, wire_bytes(arr, layout(arr) or ()), self.names[src],
                             self.names[self.rank])

    def settle(self, calls_back: int = 0, later=None) -> None:
        pass

    def next_call(self) -> None:
        pass

    def expect(self, counts) -> None:
        pass

    def abort(self, reason: str) -> None:
        pass

    def close(self) -> None:
        pass


class LocalHandle:
    """Stands in for an actor handle in local mode: `h.method.remote(*a)` calls the
    method at once."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return LocalMethod(getattr(self._obj, name))


class LocalMethod:
    def __init__(self, fn):
        self._fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self._fn(*args, **kwargs)
