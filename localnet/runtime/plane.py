"""The data plane: activations and errors straight from actor to actor.

Each message is a fixed-size *frame* (`frames.py`) -- the lengths and the versioned
msgpack header of `messages.py` -- with the payload's bytes right behind it, as
point-to-point sends of an existing engine.  The receiver rebuilds the array from its
header and then validates the message like any other (`worker.py`), so the wire contract
does not depend on the plane.

`GlooPlane`  torch.distributed point-to-point (gloo) in a process group of the actors,
             which the coordinator sets up over Ray (actor 0 hosts the TCPStore), the way
             Ray Train does for data-parallel workers.  Chosen by measurement against Ray
             actor-to-actor calls and Ray Compiled Graphs (`benchmarks/dataplane.py`,
             RESULTS.md): the least CPU per hop at every size, and a receiver that blocks
             without polling -- what a machine with fewer cores than actors needs.
(`local_plane.py`: in-process queues for `runtime.executor: local`, no Ray.)

One transfer per small message.  Each gloo transfer costs a wake-up of gloo's I/O thread
and of the waiting one on both ends, which on a small machine costs more than a small
payload's bytes, so frame and payload travel together.  A gloo receive may be larger than
what arrives, but never smaller, so the receiver posts room for a frame plus the
*previous* payload on that edge (a pipeline sends the same shapes over and over), and the
sender, who knows that size too, copies a payload that fits behind the frame.  One that
does not (an edge's first message, a larger last micro-batch) follows the frame as a
second transfer on its own tag.

A large payload (from ZERO_COPY bytes) is not copied: it goes as a second transfer
straight from the sender's array, into a body buffer the receiver posted beside the
frame's (again the previous payload's size).  The copy would cost about what the second
transfer costs, and would double the memory of what an actor has sent but its reader has
not yet taken: an activation stays alive anyway until its backward (autograd keeps it),
so sent from where it lies it costs nothing more.  If it does not fit the posted body (or
is empty), a byte fills that and the payload follows on the other tag, as above.

**Payloads on an accelerator stay there.**  Between two actors on different GPUs (device
edges), a payload goes through a second process group of the same actors whose backend
moves device memory -- NCCL (`ProcessGroupNCCL`) -- while its frame still goes over gloo:
the receiver reads the frame, then receives exactly the bytes it announces into a buffer
on its own device, and the stage computes on that.  The actors tell each other which GPU
each holds through the plane's store (`device_key`), and open every device pair before
the first batch (`_connect_device_peers`).  Two actors sharing one GPU
(fractional `num_gpus`) cannot form an NCCL pair, so between them -- and between a GPU
actor and a CPU one -- a device payload is copied to the host once and takes the gloo
path.  The frame says which path its payload took, so a host payload on a device edge (a
channel's encoded bytes) still arrives.

Each receive is posted as soon as the one before it on that edge is taken, so gloo reads
a message straight into its buffer as it arrives -- but only while this call still expects
one on that edge (`expect`), so no buffer waits between calls.

A send is asynchronous: the sender keeps the buffers until the receiver took them
(`settle`, at the start of the sender's next call); a receive
blocks for at most `runtime.timeout_s` and then names the edge.  When an actor fails mid-batch it
sends an *abort* frame to every other actor, so peers blocked on it (or on someone
waiting for it) fail at once instead of at the timeout; the coordinator then rebuilds the
plane, which drops whatever was left in flight.
"""

from __future__ import annotations

import datetime
import socket
import time

import numpy as np
import torch

from .frames import FRAME, PeerFailed, abort_frame, as_array, frame, unframe
from .messages import Header, MessageError
from .payload import host as to_host, layout, wire_bytes

ZERO_COPY = 256 << 10        # bytes: payloads from here on are sent from where they lie
_TAG, _BODY, _FIT = 7, 8, 9  # frames (+ small payloads); payloads that did not fit; large
                             # payloads into the body the receiver posted
_DEV = 10                    # device payloads, through the device group
_FILLER = torch.zeros(1, dtype=torch.uint8)  # takes a posted body that the payload outgrew


def device_key(device) -> str | None:
    """Which accelerator an actor computes on, the same string in every process that
    sees it (the GPU's UUID); None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def nccl_group(store, rank: int, world: int, timeout):
    """The device group between GPU actors: torch.distributed's NCCL backend."""
    import torch.distributed as dist

    return dist.ProcessGroupNCCL(store, rank, world, timeout)


class GlooPlane:
    """One actor's end of a gloo process group over all actors (rank = actor index)."""

    def __init__(self, addr: str, port: int, rank: int, world: int, timeout_s: float,
                 names: list[str], device="cpu", *, key: str | None = "auto",
                 device_group=nccl_group):
        """device: where this actor computes; key: its accelerator's identity ("auto":
        `device_key(device)`); device_group(store, rank, world, timeout): the process
        group that moves device payloads (tests pass a stand-in)."""
        import torch.distributed as dist

        self.rank, self.names = rank, names
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self._store = dist.TCPStore(addr, port, world, rank == 0, timeout=self.timeout,
                                    wait_for_workers=False)
        self.pg = dist.ProcessGroupGloo(self._store, rank, world, self.timeout)
        # which accelerator each actor holds: a device edge joins two different ones
        key = device_key(self.device) if key == "auto" else key
        self._store.set(f"device/{rank}", key or "")
        keys = [self._store.get(f"device/{r}").decode() or None for r in range(world)]
        self.device_peers = {r for r, k in enumerate(keys)
                             if key and k and k != key and r != rank}
        self._dev = (device_group(dist.PrefixStore("device", self._store), rank, world,
                                  self.timeout) if self.device_peers else None)
        self._connect_device_peers()
        self._pending: list = []   # (call, dst, works, buffers...) of sends not yet waited for
        self._call = 0
        # payload bytes of the last message on each edge: the room the receiver posts
        self._sent: dict[int, int] = {}    # dst -> sent there last
        self._taken: dict[int, int] = {}   # src -> received from there last
        self._posted: dict[int, tuple] = {}  # src -> (work, buffer) of the next receive
        self._left: dict[int, int] | None = None  # src -> receives this call still makes
        # the calling thread's CPU seconds in send and recv (waits included: gloo's wait
        # blocks without burning CPU), for the actors' CPU account (StageState.timings)
        self.cpu = {"send": 0.0, "recv": 0.0}

    def _connect_device_peers(self) -> None:
        """Open every device pair now, with one byte each way.  NCCL sets up a pair on its
        first transfer and blocks both ends' host until the other joins; mid-batch, an
        actor blocked so (on a first send that its reader takes only later) could stall
        the pipeline.  Every actor takes its pairs in one global order, (low rank, high
        rank) ascending, so the first pair not yet open always has both ends waiting on
        it: no cycle."""
        me = self.rank
        for peer in sorted(self.device_peers, key=lambda p: (min(p, me), max(p, me))):
            byte = torch.zeros(1, dtype=torch.uint8, device=self.device)
            first = self._dev.send if me < peer else self._dev.recv
            then = self._dev.recv if me < peer else self._dev.send
            for op in (first, then):
                op([byte], peer, _DEV).wait(self.timeout)

    @staticmethod
    def host() -> tuple[str, int]:
        """This machine's address and a free port, for the TCPStore of rank 0."""
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        s.close()
        return _ip(), port

    def send(self, dst: int, raw: bytes, payload) -> None:
        """payload: a numpy array, or a tensor (a device payload)."""
        c0 = time.thread_time()
        try:
            self._send(dst, raw, payload)
        finally:
            self.cpu["send"] += time.thread_time() - c0

    def _send(self, dst: int, raw: bytes, payload) -> None:
        if isinstance(payload, torch.Tensor):
            if dst in self.device_peers:
                self._send_device(dst, raw, payload)
                return
            payload = to_host(payload)  # once: the peer cannot read this device
        n = payload.nbytes
        room = self._sent.get(dst, 0)  # the receiver posted room for this much
        inline = n <= room < ZERO_COPY
        data = wire_bytes(payload, layout(payload) or ())  # as it lies: its header's order
        buf = frame(raw, n, n if inline else 0)
        if inline and n:  # the one copy: frame and payload as one transfer
            buf.numpy()[FRAME:] = data
        works = [self.pg.send([buf], dst, _TAG)]
        body = None
        if n and not inline:
            body = torch.from_numpy(data)
        if room >= ZERO_COPY:  # the receiver posted a body of `room` bytes beside the frame
            fits = body is not None and n <= room
            works.append(self.pg.send([body if fits else _FILLER], dst, _FIT))
            if body is not None and not fits:
                works.append(self.pg.send([body], dst, _BODY))
        elif body is not None:
            works.append(self.pg.send([body], dst, _BODY))
        self._sent[dst] = n
        # the buffers gloo reads from stay alive until the receiver took them (settle);
        # the payload itself only through `body`, which views it: an inline payload was
        # copied into `buf`, and keeping the array too would keep the error it came from
        # (often nothing else holds it) for the rest of the call
        self._pending.append((self._call, dst, works, buf, body))

    def _send_device(self, dst: int, raw: bytes, payload: torch.Tensor) -> None:
        """The frame over gloo, the payload from where it lies through the device group."""
        n = payload.nbytes
        buf = frame(raw, n, device=True)
        works = [self.pg.send([buf], dst, _TAG)]
        if self._sent.get(dst, 0) >= ZERO_COPY:  # the receiver posted a host body: fill it
            works.append(self.pg.send([_FILLER], dst, _FIT))
        body = wire_bytes(payload.detach(), layout(payload) or ())
        if n:
            works.append(self._dev.send([body], dst, _DEV))
        self._sent[dst] = 0  # the receiver posts a bare frame next (see recv)
        self._pending.append((self._call, dst, works, buf, body))

    def settle(self, calls_back: int = 0, later: dict[int, int] | None = None) -> None:
        """Wait until the receivers took what this actor sent before its last
        `calls_back` calls, and free those buffers.  A gloo send is done only once
        waited for (`is_completed` stays False until then), so without this every
        payload ever sent would stay in memory.  calls_back=0 once a flushing batch is
        over (every message, the last call's too, was taken within it); 2 at the start
        of an async call (a message may be taken in the receiver's next call).
        later: dst -> calls_back for receivers that take a message calls later still
        (async DFA's error, `schedules.take_lags`); waiting for one sooner would block
        on a call the coordinator issues only after this one's reply."""
        later = later or {}
        rest = []
        for entry in self._pending:
            if entry[0] <= self._call - later.get(entry[1], calls_back):
                for w in entry[2]:
                    self._wait(w, self.names[entry[1]], self.names[self.rank], entry)
            else:
                rest.append(entry)
        self._pending = rest

    def _untaken(self, entry) -> MessageError:
        """A send its receiver did not take in time, named by the edge and (from its
        frame) the message."""
        call, dst, _, buf = entry[:4]
        me, peer = self.names[self.rank], self.names[dst]
        reason = (f"{peer} did not take it within {self.timeout.total_seconds():g} s "
                  f"(runtime.timeout_s; sent {self._call - call} calls ago)")
        try:
            h = Header.decode(unframe(buf, me, peer)[0])
        except (MessageError, PeerFailed, ValueError):  # an abort frame: no message
            return MessageError(reason, me, peer)
        # the edge's own ends: a broadcast's header names no single receiver
        return MessageError(reason, me, peer, h.kind, h.step, h.mb)

    def next_call(self) -> None:
        self._call += 1

    def recv(self, src: int) -> tuple[bytes, np.ndarray]:
        c0 = time.thread_time()
        try:
            return self._recv(src)
        finally:
            self.cpu["recv"] += time.thread_time() - c0

    def _recv(self, src: int) -> tuple[bytes, np.ndarray]:
        me, peer = self.names[self.rank], self.names[src]
        room = self._taken.get(src, 0)
        work, buf, fit = self._posted.pop(src, None) or self._post(src, room)
        self._wait(work, peer, me)
        b = buf.numpy()
        raw, nbytes, on_dev = unframe(b, peer, me)
        if on_dev:
            return raw, self._recv_device(src, raw, nbytes, fit, peer, me)
        if fit is not None:  # a large payload: into the body posted beside the frame
            self._wait(fit[0], peer, me)  # (a filler byte, if the payload outgrew it)
            body = fit[1].numpy()
        else:
            body = b[FRAME:]
        if nbytes <= room:
            data = body[:nbytes]
        else:
            big = torch.empty(nbytes, dtype=torch.uint8)
            self._wait(self.pg.recv([big], src, _BODY), peer, me)
            data = big.numpy()
        self._taken[src] = nbytes
        self._advance(src)
        return raw, as_array(raw, data, peer, me)

    def _advance(self, src: int) -> None:
        """One message from src taken: post the next one's receive (room for this one's
        payload), if this call takes another from src."""
        if self._left is not None:
            self._left[src] = self._left.get(src, 0) - 1
        if self._left is None or self._left[src] > 0:
            self._posted[src] = self._post(src, self._taken[src])

    def _recv_device(self, src: int, raw: bytes, nbytes: int, fit, peer: str, me: str):
        """The payload a frame announced, received through the device group into this
        actor's device: exactly `nbytes` (NCCL matches sizes), so nothing is posted ahead
        for it, and the next frame on this edge is posted bare, as its sender expects."""
        if src not in self.device_peers:
            raise MessageError("a device payload from an actor that shares no device "
                               "group with this one", peer, me)
        if fit is not None:  # the host body posted after a large host payload: a filler
            self._wait(fit[0], peer, me)
        body = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:
            self._wait(self._dev.recv([body], src, _DEV), peer, me)
        self._taken[src] = 0
        self._advance(src)
        return as_array(raw, body, peer, me)

    def expect(self, counts: dict[int, int]) -> None:
        """How many messages this call takes from each actor (None: unknown, post ahead
        always)."""
        self._left = None if counts is None else dict(counts)

    def _post(self, src: int, room: int) -> tuple:
        """(frame's receive, its buffer, None or (body's receive, its buffer))."""
        if room >= ZERO_COPY:
            head, body = (torch.empty(n, dtype=torch.uint8) for n in (FRAME, room))
            return (self.pg.recv([head], src, _TAG), head,
                    (self.pg.recv([body], src, _FIT), body))
        buf = torch.empty(FRAME + room, dtype=torch.uint8)
        return self.pg.recv([buf], src, _TAG), buf, None

    def _wait(self, work, peer: str, me: str, sent=None) -> None:
        """A receive from peer, or (sent: its pending entry) a send to it."""
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            text = str(err)
            if "imed out" not in text:
                raise PeerFailed(peer, me, text.splitlines()[0][-200:]) from None
            if sent is not None:
                raise self._untaken(sent) from None
            raise MessageError(f"nothing arrived within {self.timeout.total_seconds():g} s "
                               f"(runtime.timeout_s)", peer, me) from None


    def abort(self, reason: str) -> None:
        """Tell every other actor this one failed (not waited for: the plane is rebuilt).
        What this actor already sent stays pending: dropping a send in flight would
        cancel it, and the peer waiting for it would wait for the timeout instead of
        reading on to the abort frame."""
        f = abort_frame(self.names[self.rank], reason)
        for dst in range(len(self.names)):
            if dst != self.rank:
                try:
                    self._pending.append((self._call, dst, [self.pg.send([f], dst, _TAG)], f))
                except RuntimeError:
                    pass  # that peer's connection is gone already

    def close(self) -> None:
        self._pending = []
        self._posted = {}
        self.pg = self._dev = None
        self._store = None


def _ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    return socket.gethostbyname(socket.gethostname())
