"""Wire messages: typed, versioned headers; receiver-side validation; no parameters."""

import pickle

import msgpack
import numpy as np
import pytest
import torch
import torch.nn as nn

from localnet.errors import DivergedError
from localnet.runtime.messages import (ACTIVATION, ERROR, OUTPUT, SCHEMA_VERSION, TARGET, Control,
                                       Header, Message, MessageError, NonFiniteMessage, all_finite,
                                       validate)


def _act(t=None, **kw):
    t = torch.randn(4, 8) if t is None else t
    args = dict(src="stage0", dst="stage1", step=3, mb=1, run="r1", detail="train")
    args.update(kw)
    return Message.make(ACTIVATION, t, **args)


def test_roundtrip_header_and_payload():
    m = _act()
    raw, payload = m.wire()
    h = msgpack.unpackb(raw)
    assert h["v"] == SCHEMA_VERSION and h["kind"] == "activation" and h["run"] == "r1"
    assert (h["src"], h["dst"], h["step"], h["mb"]) == ("stage0", "stage1", 3, 1)
    assert h["dtype"] == "float32" and h["shape"] == [4, 8]
    back = Message.from_wire(raw, payload)
    assert back.header == m.header
    assert torch.equal(back.tensor(), torch.from_numpy(payload))
    assert m.header_bytes == len(raw) and m.payload_bytes == 4 * 8 * 4


def test_each_header_is_decoded_from_its_own_bytes():
    # Header.decode remembers the last bytes object it decoded (the plane and then the
    # receiver decode every header): another message's bytes never get its header
    a, b = _act(step=1).raw_header, _act(step=2).raw_header
    assert Header.decode(a).step == 1 and Header.decode(b).step == 2
    assert Header.decode(a).step == 1
    assert Header.decode(a) is Header.decode(a)
    bad = Header(**{**Header.decode(a).__dict__, "version": SCHEMA_VERSION + 1}).encode()
    with pytest.raises(MessageError, match="schema version"):
        Header.decode(bad)
    assert Header.decode(b).step == 2


def test_read_only_payload_is_copied_before_use():
    m = _act()
    arr = m.payload.copy()
    arr.setflags(write=False)  # what Ray's object store hands over
    t = Message(m.header, arr, m.raw_header).tensor()
    t.add_(1)  # must not touch shared memory
    assert np.array_equal(arr, m.payload)


def test_no_kind_carries_a_parameter():
    p = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(TypeError, match="nn.Parameter"):
        Message.make(ERROR, p, src="stage1", dst="stage0", step=0, mb=0)
    with pytest.raises(ValueError, match="unknown data kind"):
        Message.make("parameter", torch.randn(3), src="stage1", dst="stage0", step=0, mb=0)
    with pytest.raises(TypeError):  # control messages hold scalars only
        Control("step", src="driver", dst="stage0", args={"w": torch.randn(2)})


def test_validate_accepts_a_good_message():
    m = _act()
    assert validate(m, ACTIVATION, (None, 8), torch.float32, dst="stage1", step=3, mb=1) is m


@pytest.mark.parametrize("change, match", [
    (dict(kind=ERROR), "expected kind 'error', got 'activation'"),
    (dict(shape=(None, 9)), r"expected shape \['\*', 9\], got \[4, 8\]"),
    (dict(shape=(4, 8, 1)), "expected shape"),
    (dict(dtype=torch.float64), "expected dtype float64, got float32"),
    (dict(step=4), "expected step 4, got step 3"),
    (dict(mb=0), "expected micro-batch 0"),
    (dict(dst="stage2"), "delivered to 'stage2'"),
])
def test_validate_names_edge_kind_and_step(change, match):
    args = dict(kind=ACTIVATION, shape=(None, 8), dtype=torch.float32, dst="stage1", step=3, mb=1)
    args.update(change)
    with pytest.raises(MessageError, match=match) as info:
        validate(_act(), args.pop("kind"), args.pop("shape"), args.pop("dtype"), **args)
    err = info.value
    assert "stage0->stage1" in str(err) or "stage0->stage2" in str(err)
    assert "step 3" in str(err) and "activation" in str(err)
    assert err.step == 3 and err.kind == "activation"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_error_is_rejected(bad):
    e = torch.randn(4, 10)
    e[2, 3] = bad
    m = Message.make(ERROR, e, src="stage2", dst="stage1", step=7, mb=0, detail="chain")
    with pytest.raises(MessageError, match="not finite") as info:
        validate(m, ERROR, (4, 10), torch.float32)
    assert info.value.edge == "stage2->stage1" and info.value.step == 7
    assert "bad error message on edge stage2->stage1 at step 7" in str(info.value)
    # a divergence, not a transport fault (the run's advice is about the rate), and it
    # stays one through pickling (how it leaves an actor)
    assert isinstance(info.value, DivergedError) and isinstance(info.value, NonFiniteMessage)
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is NonFiniteMessage and str(back) == str(info.value)
    assert info.value.what.startswith("the error on edge stage2->stage1 (micro-batch 0): 1 of 40")
    with pytest.raises(MessageError) as other:
        validate(m, ERROR, (4, 11), torch.float32)
    assert not isinstance(other.value, DivergedError)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_the_finiteness_check_agrees_with_the_exact_mask(dtype):
    # the check sums first; the truth is numpy's element-wise mask
    big = np.finfo(dtype).max
    cases = {"finite": np.random.default_rng(0).standard_normal(5000),
             "sum overflows, every value finite": np.full(64, big),
             "+inf and -inf cancel to NaN": np.array([1.0, np.inf, -np.inf, 2.0]),
             "NaN last": np.r_[np.zeros(1023), np.nan],
             "inf first": np.r_[np.inf, np.ones(7)], "empty": np.zeros(0)}
    for name, values in cases.items():
        a = values.astype(dtype)
        truth = bool(np.isfinite(a).all())
        assert all_finite(a) is truth, name
        assert all_finite(torch.from_numpy(a.copy())) is truth, name  # a device payload
        a.flags.writeable = False
        assert all_finite(a) is truth, name
    assert all_finite(np.arange(5)) and all_finite(torch.arange(5))  # integers: finite


def test_header_payload_mismatch_and_version():
    m = _act()
    lying = Message(m.header, m.payload[:, :4].copy(), m.raw_header)
    with pytest.raises(MessageError, match="does not match its header"):
        validate(lying, ACTIVATION)
    h = Header(**{**m.header.__dict__, "version": SCHEMA_VERSION + 1})
    with pytest.raises(MessageError, match="schema version"):
        Message.from_wire(h.encode(), m.payload)
    with pytest.raises(MessageError, match="undecodable"):
        Message.from_wire(b"\x00garbage", m.payload)


def test_broadcast_output_error_and_targets():
    e = Message.make(ERROR, torch.randn(4, 10), src="stage2", dst="*", step=1, mb=0, detail=OUTPUT)
    for stage in ("stage0", "stage1"):
        validate(e, ERROR, (4, 10), torch.float32, detail=OUTPUT, dst=stage)
    with pytest.raises(MessageError, match="detail 'chain'"):
        validate(e, ERROR, detail="chain")
    t = Message.make(TARGET, torch.tensor([1, 2, 3]), src="driver", dst="stage2", step=1, mb=0,
                     meta={"batch": 12})
    validate(t, TARGET, (3,), torch.int64)
    assert Message.from_wire(*t.wire()).header.meta == {"batch": 12}


def test_pickles_through_ray():  # MessageError survives a process boundary
    import pickle
    err = MessageError("boom", "stage1", "stage0", "error", 5, 2)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.edge == "stage1->stage0" and back.step == 5


def test_control_roundtrip_and_checks():
    c = Control("step", src="driver", dst="stage1", step=9, run="r", args={"lr": 0.1, "wd": 0.0})
    back = Control.decode(c.encode(), "step")
    assert back == c
    with pytest.raises(MessageError, match="expected control op 'mirror'"):
        Control.decode(c.encode(), "mirror")
    with pytest.raises(ValueError, match="unknown control op"):
        Control("launch", src="driver", dst="stage0")
    with pytest.raises(MessageError, match="expected a control message"):
        Control.decode(_act().raw_header)


def test_one_activation_addressed_to_several_receivers():
    """A block input read by conv1 and by the merge is one message for both."""
    m = _act(dst="stage1,stage2")
    for who in ("stage1", "stage2"):
        validate(m, ACTIVATION, (4, 8), torch.float32, dst=who)
    with pytest.raises(MessageError, match="delivered to 'stage3'"):
        validate(m, ACTIVATION, dst="stage3")


# ---------------------------------------------------------------------------- data plane
def test_a_payload_made_on_an_accelerator_stays_a_tensor_there():
    """Message.make keeps a tensor that is not on the CPU as itself: a meta tensor
    stands in for a GPU's, and any copy to the host would raise.  validate checks a
    tensor payload as it does an array: against its header, and finite where it lies."""
    t = torch.empty(2, 3, device="meta")
    m = _act(t)
    assert isinstance(m.payload, torch.Tensor) and m.payload.device.type == "meta"
    assert m.payload_bytes == 24
    assert m.header.shape == (2, 3) and m.header.dtype == "float32" and m.tensor() is m.payload
    validate(m, ACTIVATION, (None, 3), torch.float32, finite=False)
    x = torch.tensor([[1.0, float("nan")]])
    ok = _act(x)  # made on the CPU: an array; as a tensor it must pass the same checks
    with pytest.raises(MessageError, match="1 of 2 values are not finite"):
        validate(Message(ok.header, x, ok.raw_header), ACTIVATION)
    with pytest.raises(MessageError, match="does not match its header"):
        validate(Message(ok.header, torch.zeros(1, 3), ok.raw_header), ACTIVATION)
    assert validate(Message(ok.header, torch.ones(1, 2), ok.raw_header), ACTIVATION)
    assert np.array_equal(Message(ok.header, x, ok.raw_header).host(), x.numpy(),
                          equal_nan=True)


def test_plane_frames_carry_the_header_and_rebuild_the_payload():
    """A frame holds the header; the receiver views the payload's bytes as the array
    the header describes, and refuses bytes that do not match it."""
    import numpy as np

    from localnet.runtime.local_plane import LocalPlane
    from localnet.runtime.frames import PeerFailed, abort_frame, as_array, frame, unframe

    m = _act(torch.randn(3, 5))
    raw, n, on_dev = unframe(frame(m.raw_header, m.payload_bytes), "stage0", "stage1")
    assert raw == m.raw_header and n == 60 and not on_dev
    assert unframe(frame(m.raw_header, 60, device=True), "stage0", "stage1")[2]
    arr = as_array(raw, m.payload.reshape(-1).view(np.uint8).copy(), "stage0", "stage1")
    assert arr.shape == (3, 5) and np.array_equal(arr, m.payload)
    with pytest.raises(MessageError, match="payload of 56 bytes") as info:
        as_array(raw, np.zeros(56, np.uint8), "stage0", "stage1")
    assert info.value.edge == "stage0->stage1"
    with pytest.raises(MessageError, match="undecodable header"):
        as_array(b"junk", np.zeros(4, np.uint8), "stage0", "stage1")
    with pytest.raises(PeerFailed, match="stage3 failed, so stage1 stopped: boom"):
        unframe(abort_frame("stage3", "boom"), "stage0", "stage1")
    with pytest.raises(ValueError, match="does not fit"):
        frame(b"x" * 5000, 0)
    plane = LocalPlane(["stage0", "stage1"])
    a, b = plane.endpoint(0), plane.endpoint(1)
    assert not b.ready(0)
    a.send(1, m.raw_header, m.payload)
    got_raw, got = b.recv(0)
    assert got_raw == m.raw_header and np.array_equal(got, m.payload)
    assert not np.shares_memory(got, m.payload)  # a copy, as a real plane makes


def _gloo_pair(names, **kw):
    """One GlooPlane per name, joined from threads of this process; kw[name][rank]: that
    rank's keyword arguments."""
    import threading

    from localnet.runtime.plane import GlooPlane

    addr, port = GlooPlane.host()
    planes = [None] * len(names)

    def join(rank):
        planes[rank] = GlooPlane(addr, port, rank, len(names), 30, names,
                                 **{k: v[rank] for k, v in kw.items()})

    threads = [threading.Thread(target=join, args=(r,)) for r in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return planes


def test_gloo_plane_carries_payloads_of_any_size_in_order():
    """Frame and payload go as one transfer when the payload fits the room the receiver
    posted (the previous payload's size on that edge), as two when it does not; after a
    large payload (ZERO_COPY and up) the receiver posts a body beside the frame and the
    next payload goes into it uncopied (a filler byte first, if it outgrew it).  Either
    way every message arrives whole and in order: growing, shrinking, empty, other
    dtypes, several sent before any is taken, and both directions at once."""
    import numpy as np

    from localnet.runtime.frames import FRAME
    from localnet.runtime.plane import ZERO_COPY

    a, b = _gloo_pair(["stage0", "stage1"])
    assert a._dev is None and not b.device_peers  # CPU actors: no device group
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (4, 8), (64, 33), (2, 3), (64, 33), (0, 5), (7,), (128, 1024),
              (128, 1024), (64, 1024), (128, 1024), (3, 3), (64, 1024), (0, 5), (3, 3)]
    sent = [_act(torch.randn(*s, generator=g, dtype=torch.float64 if i % 3 == 2 else
                             torch.float32)) for i, s in enumerate(shapes)]
    back = _act(torch.randn(5, 5, generator=g))
    for m in sent[:4]:  # queued before the receiver takes any
        a.send(1, m.raw_header, m.payload)
    b.send(0, back.raw_header, back.payload)
    for m in sent[4:]:
        a.send(1, m.raw_header, m.payload)
    sizes = [0] + [m.payload_bytes for m in sent]
    big = [prev >= ZERO_COPY for prev in sizes[:-1]]
    outgrew = [n > prev for prev, n in zip(sizes, sizes[1:])]
    empty = [n == 0 for n in sizes[1:]]
    # a second transfer where the payload outgrew the last one, or follows a large one
    # (then into the posted body; a filler byte there if it outgrew that or is empty); a
    # third where both
    assert [len(e[2]) for e in a._pending] == [1 + (x or o) + (x and o)
                                               for x, o in zip(big, outgrew)]
    assert [e[4] is not None for e in a._pending] == [(x or o) and not z
                                                      for x, o, z in zip(big, outgrew, empty)]
    assert sum(x and not o and not z for x, o, z in zip(big, outgrew, empty)) >= 2
    assert sum(x and o for x, o in zip(big, outgrew)) >= 1
    assert sum(x and z for x, z in zip(big, empty)) == 1
    for e, m, x, z in zip(a._pending, sent, big, empty):
        if x and not z:  # sent from where it lies: no copy, and a frame without room
            assert np.shares_memory(e[4].numpy(), m.payload) and e[3].numel() == FRAME
    for m in sent:
        raw, got = b.recv(0)
        assert raw == m.raw_header and got.dtype == m.payload.dtype
        assert np.array_equal(got, m.payload)
    raw, got = a.recv(1)
    assert raw == back.raw_header and np.array_equal(got, back.payload)
    # what b posted for the next message on the edge is room for the last payload
    assert b._taken[0] == sent[-1].payload_bytes
    a.settle(0), b.settle(0)
    a.close(), b.close()


def test_device_payloads_never_visit_the_host_between_different_accelerators(monkeypatch):
    """Between actors on different accelerators a payload makes no host round trip: the
    sender's tensor itself goes through the device group, into a buffer the receiver
    made on its own device, and comes out as a tensor there.  Between actors sharing one
    accelerator (no NCCL pair) it goes to the host once and over gloo.  Host and device
    payloads mix on one edge in any order (a host body posted after a large host payload
    is filled).  Every device pair is opened when the plane is (NCCL would otherwise
    block a first sender mid-batch).  On CPU a gloo group stands in for NCCL; host copies
    are counted."""
    import numpy as np
    import torch.distributed as dist

    from localnet.runtime import plane as plane_mod
    from localnet.runtime.plane import ZERO_COPY

    sent, made = [], []  # what went into the device group, and every buffer it filled

    class Spy:
        def __init__(self, store, rank, world, timeout):
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)

        def send(self, ts, dst, tag):
            sent.append(ts[0].data_ptr())
            return self.pg.send(ts, dst, tag)

        def recv(self, ts, src, tag):
            made.append(ts[0].data_ptr())
            return self.pg.recv(ts, src, tag)

    copies = []

    def counted_host(payload):
        copies.append(payload.shape)
        return host(payload)

    host = plane_mod.to_host
    monkeypatch.setattr(plane_mod, "to_host", counted_host)
    names = ["stage0", "stage1", "stage2"]
    a, b, c = _gloo_pair(names, key=["gpu-a", "gpu-b", "gpu-a"],
                         device_group=[Spy] * 3)
    assert a.device_peers == {1} and b.device_peers == {0, 2} and c.device_peers == {1}
    assert len(sent) == len(made) == 4  # each device pair opened at once, a byte each way
    sent.clear(), made.clear()
    g = torch.Generator().manual_seed(0)
    big = (ZERO_COPY // 4) * 2
    payloads = [torch.randn(big, generator=g).numpy(), torch.randn(4, 8, generator=g),
                torch.randn(big, generator=g), torch.randn(3, generator=g).numpy(),
                torch.zeros(0, 5), torch.randn(16, 16, generator=g, dtype=torch.float64)]
    msgs = [_act(torch.as_tensor(p)) for p in payloads]
    for m, p in zip(msgs, payloads):
        a.send(1, m.raw_header, p)
    device = [isinstance(p, torch.Tensor) for p in payloads]
    assert sent == [p.data_ptr() for p, d in zip(payloads, device) if d and p.numel()]
    for m, p, d in zip(msgs, payloads, device):
        raw, got = b.recv(0)
        assert raw == m.raw_header and isinstance(got, torch.Tensor) == d
        assert np.array_equal(np.asarray(got), np.asarray(p)) and got.shape == p.shape
        if d and p.numel():
            assert got.untyped_storage().data_ptr() == made.pop(0)  # the group's buffer
    assert not copies and not made
    x = torch.randn(5, 7, generator=g)  # one accelerator shared: to the host once
    m = _act(x)
    a.send(2, m.raw_header, x)
    raw, got = c.recv(0)
    assert isinstance(got, np.ndarray) and np.array_equal(got, x.numpy())
    assert copies == [x.shape] and len(sent) == 3  # nothing more through the group
    for p in (a, b, c):
        p.settle(0)
        p.close()


def test_device_pairs_open_in_an_order_without_a_cycle():
    """NCCL opens a pair on its first transfer and holds both ends until both are there.
    A stand-in group whose every transfer is such a meeting: four actors, each on its own
    accelerator, all open their six pairs when the plane opens, and none waits forever."""
    import threading

    meet: dict = {}
    lock = threading.Lock()

    class Meeting:
        def __init__(self, store, rank, world, timeout):
            self.rank = rank

        def _op(self, peer):
            with lock:
                b = meet.setdefault((min(self.rank, peer), max(self.rank, peer)),
                                    threading.Barrier(2))

            class Done:
                @staticmethod
                def wait(timeout):
                    b.wait(5)  # BrokenBarrierError after 5 s: a cycle
            return Done()

        def send(self, ts, dst, tag):
            return self._op(dst)

        def recv(self, ts, src, tag):
            return self._op(src)

    planes = _gloo_pair([f"stage{i}" for i in range(4)], key=[f"gpu-{i}" for i in range(4)],
                        device_group=[Meeting] * 4)
    assert all(p is not None and len(p.device_peers) == 3 for p in planes)
    assert sorted(meet) == [(i, j) for i in range(4) for j in range(i + 1, 4)]
    for p in planes:
        p.close()


def test_gloo_plane_frees_every_send_of_a_flushing_batch():
    """A gloo send's buffers are freed only once it is waited for.  At the end of a
    flushing batch (settle(0)) every send is taken, so none may stay -- this call's
    included; at the start of an async call (settle(2)) the last two calls' sends
    stay, since their receivers may take them only in their next call."""
    import numpy as np

    a, b = _gloo_pair(["stage0", "stage1"])
    m = _act(torch.randn(4, 8))
    for call in range(3):
        a.settle(calls_back=2)
        a.next_call()
        a.send(1, m.raw_header, m.payload)
        raw, got = b.recv(0)
        assert raw == m.raw_header and np.array_equal(got, m.payload)
    a.settle(2, later={1: 4})  # a receiver that takes them calls later: none waited for
    assert [e[0] for e in a._pending] == [1, 2, 3]
    a.settle(calls_back=2)
    assert [e[0] for e in a._pending] == [2, 3]  # the last two calls' sends stay
    a.settle(calls_back=0)
    assert a._pending == []
    a.close(), b.close()


def test_a_send_its_receiver_never_takes_names_the_edge_and_the_message():
    """gloo completes a send only once its receiver took it, so a sender that waits for
    one too soon (or a receiver that stopped taking) fails at runtime.timeout_s with the
    edge, the message and how many calls ago it went -- not gloo's bare timeout."""
    import datetime

    a, b = _gloo_pair(["stage0", "stage1"])
    a.timeout = datetime.timedelta(seconds=1)
    m = _act(torch.randn(64, 1024))
    a.next_call()
    a.send(1, m.raw_header, m.payload)
    a.next_call()
    with pytest.raises(MessageError, match=r"activation message on edge stage0->stage1 at "
                       r"step 3 \(micro-batch 1\): stage1 did not take it within 1 s "
                       r"\(runtime.timeout_s; sent 1 calls ago\)"):
        a.settle(calls_back=0)
    a.close(), b.close()


def test_a_channels_last_payload_travels_as_it_lies():
    """A channels-last activation is sent without a copy into row-major order: its
    header names the bytes' order, the frame carries them as they lie, and the receiver
    gets the same values in the same layout (over gloo, and over the local plane).  A
    header whose order is no order of its axes is refused, naming the edge; an array in
    neither dense layout is copied into row-major order first."""
    from localnet.runtime.payload import CHANNELS_LAST, layout, wire_bytes
    from localnet.runtime.local_plane import LocalPlane
    from localnet.runtime.frames import as_array

    t = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    m = _act(t)
    assert m.header.order == CHANNELS_LAST and msgpack.unpackb(m.raw_header)["order"] == [0, 2, 3, 1]
    assert np.shares_memory(m.payload, t.numpy()) and m.payload.shape == (2, 3, 4, 5)
    flat = wire_bytes(m.payload, m.header.order)
    assert np.shares_memory(flat, m.payload)  # the bytes as they lie: a view
    assert np.array_equal(flat.view(np.float32), t.permute(0, 2, 3, 1).reshape(-1).numpy())
    got = as_array(m.raw_header, flat.copy(), "stage0", "stage1")
    assert np.array_equal(got, t.numpy()) and layout(got) == CHANNELS_LAST
    assert torch.from_numpy(got).is_contiguous(memory_format=torch.channels_last)

    plane = LocalPlane(["stage0", "stage1"])
    plane.endpoint(0).send(1, m.raw_header, m.payload)
    _, got = plane.endpoint(1).recv(0)
    assert np.array_equal(got, t.numpy()) and layout(got) == CHANNELS_LAST

    a, b = _gloo_pair(["stage0", "stage1"])
    big = torch.randn(8, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    msgs = [m, _act(big), _act(big + 1), _act(torch.randn(2, 3, 4, 5))]  # then row-major
    for x in msgs:
        a.send(1, x.raw_header, x.payload)
    for x in msgs:
        raw, got = b.recv(0)
        assert raw == x.raw_header and np.array_equal(got, x.payload)
        assert layout(got) == x.header.order
    a.settle(0), b.settle(0)
    a.close(), b.close()

    bad = Header(**{**m.header.__dict__, "order": (0, 1, 1, 3)}).encode()
    with pytest.raises(MessageError, match=r"order \[0, 1, 1, 3\] is not an order") as info:
        Header.decode(bad)
    assert info.value.edge == "stage0->stage1"
    strided = _act(torch.randn(4, 6)[:, ::2])
    assert strided.header.order == () and strided.payload.flags.c_contiguous
    assert layout(torch.randn(4, 6)[:, ::2]) is None
