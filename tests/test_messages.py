"""Wire messages: typed, versioned headers; receiver-side validation; no parameters."""

import os

import msgpack
import numpy as np
import pytest
import torch
import torch.nn as nn

from localnet.runtime import shm
from localnet.runtime.messages import (ACTIVATION, ERROR, OUTPUT, SCHEMA_VERSION, TARGET, Control,
                                       Header, Message, MessageError, validate)


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


# ---------------------------------------------------------------------------- shared memory
needs_shm = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


def _shm_files(run):
    return [n for n in os.listdir(shm.ROOT) if n.startswith(shm.prefix(run))]


@needs_shm
def test_payload_through_shared_memory_is_the_same_message():
    m = _act(torch.randn(3, 5, 7), run="shm-a")
    s = m.via_shm("shm-a")
    raw, payload = s.wire()
    assert payload.size == 0 and payload.dtype == np.float32      # nothing on the wire
    name = msgpack.unpackb(raw)["meta"]["shm"]
    assert _shm_files("shm-a") == [name]
    assert os.path.getsize(os.path.join(shm.ROOT, name)) == m.payload_bytes
    # the sender's ledger counts the same payload; the header names the file
    assert s.payload_bytes == m.payload_bytes and s.header_bytes > m.header_bytes
    back = Message.from_wire(raw, payload)
    assert back.header == s.header and torch.equal(back.tensor(), m.tensor())
    assert back.payload.flags.writeable                         # a fresh array of its own
    assert _shm_files("shm-a") == []                            # read once, then deleted
    validate(back, ACTIVATION, (None, 5, 7), torch.float32, dst="stage1")


@needs_shm
def test_bad_shared_memory_payloads_name_the_edge():
    m = _act(run="shm-b").via_shm("shm-b")
    raw, payload = m.wire()
    Message.from_wire(raw, payload)
    with pytest.raises(MessageError, match="does not exist") as info:   # read twice
        Message.from_wire(raw, payload)
    assert info.value.edge == "stage0->stage1" and info.value.step == 3
    # a file shorter than its header says
    m = _act(run="shm-b").via_shm("shm-b")
    raw, payload = m.wire()
    os.truncate(os.path.join(shm.ROOT, m.header.meta["shm"]), 12)
    with pytest.raises(MessageError, match="has 12 bytes, its header says 128"):
        Message.from_wire(raw, payload)
    assert _shm_files("shm-b") == []
    # a name that is not localnet's never opens a file
    for name in ("../etc/passwd", "localnet-x/../../etc/passwd", 7):
        bad = Header(**{**m.header.__dict__, "meta": {"shm": name}})
        with pytest.raises(MessageError, match="not one of localnet's"):
            Message.from_wire(bad.encode(), np.empty(0, np.float32))
    # a payload on the wire as well as in shared memory
    m = _act(run="shm-b").via_shm("shm-b")
    with pytest.raises(MessageError, match="on the wire and one in shared memory"):
        Message.from_wire(m.raw_header, m.payload)
    # what a failed step leaves is swept, for its run only
    _act(run="shm-c").via_shm("shm-c")
    assert shm.sweep("shm-b") == 1 and _shm_files("shm-b") == []
    assert shm.sweep("shm-c") == 1


@needs_shm
def test_files_of_processes_that_are_gone_are_swept():
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = os.path.join(shm.ROOT, f"{shm.prefix('shm-d')}{int(dead.stdout)}-0")
    open(gone, "wb").close()
    mine = _act(run="shm-d").via_shm("shm-d")          # this process is alive: kept
    assert shm.sweep_orphans() >= 1
    assert not os.path.exists(gone)
    assert _shm_files("shm-d") == [mine.header.meta["shm"]]
    shm.sweep("shm-d")


@needs_shm
def test_full_shared_memory_falls_back_to_the_wire(monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    m = _act(run="shm-e")
    monkeypatch.setattr(os, "write", full)
    s = m.via_shm("shm-e")
    assert s is m and not s.out_of_band and _shm_files("shm-e") == []
    raw, payload = s.wire()
    assert torch.equal(Message.from_wire(raw, payload).tensor(), m.tensor())
