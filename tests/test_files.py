"""Files a run writes: atomic writes, and checkpoints that are only data (localnet/files.py).

A checkpoint whose pickle would run code when loaded -- here it would create a marker
file -- must be refused with an error naming the file, by `--resume` and by every
loader, and the marker must never appear.
"""

import builtins
import fcntl
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from localnet.cli import main
from localnet.files import (LOCK, CheckpointError, counted, RunInUseError, atomic_write, load_state,
                            lock_holder, run_lock, save_state)
from localnet.train import train

from test_train import small


class Evil:
    """Unpickling this calls open(marker, "w"): it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def plant(path: Path, marker: Path, keep: dict | None = None) -> None:
    """Overwrite a checkpoint with one that still looks like it (same keys) but carries
    a payload that runs code when unpickled without restriction."""
    state = dict(keep or {})
    state["payload"] = Evil(marker)
    torch.save(state, path)


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("old")

    def half(p):
        p.write_text("ne")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(f, half)
    assert f.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary left behind
    atomic_write(f, lambda p: p.write_text("new"))
    assert f.read_text() == "new"


def test_state_round_trips_as_data(tmp_path):
    state = {"w": torch.randn(3, 2), "rng": torch.get_rng_state(), "step": 7,
             "nested": [{"a": 1.5, "b": "x"}, (1, 2)], "none": None}
    save_state(state, tmp_path / "s.pt")
    back = load_state(tmp_path / "s.pt")
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["rng"], state["rng"])
    assert back["nested"] == state["nested"] and back["step"] == 7 and back["none"] is None


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path / "bad.pt", marker)
    with pytest.raises(CheckpointError, match=r"bad\.pt is refused.*could run code") as info:
        load_state(tmp_path / "bad.pt")
    assert "GLOBAL io.open" in str(info.value)  # says what it tried to load (open)
    assert not marker.exists()
    # the unrestricted loader would have run it: the test's payload is real
    torch.load(tmp_path / "bad.pt", weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_state({"w": torch.ones(1000)}, tmp_path / "s.pt")
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(tmp_path / "s.pt")


def test_resume_refuses_a_malicious_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    ckpt = run / "checkpoint.pt"
    plant(ckpt, tmp_path / "marker", keep=load_state(ckpt))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["run", "--resume", str(run), "--set", "train.epochs=2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"localnet: checkpoint {ckpt} is refused" in err and "could run code" in err
    assert "Traceback" not in err
    assert not (tmp_path / "marker").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing lost


def test_a_run_directory_in_use_is_refused_and_nothing_in_it_changes(tmp_path, capsys):
    """A --resume (or a new run given its --out) of a run still training elsewhere would
    write its checkpoint over the other's: refused, naming the holder, with no file
    touched and no advice to resume over it."""
    run = tmp_path / "run"
    train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    assert not (run / LOCK).exists()  # a finished run keeps no lock file
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with run_lock(run):
        held = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK}
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()} on "):
            train(small("rule.name=fa", "train.epochs=2"), run, resume=True, progress=False)
        assert main(["run", "--resume", str(run), "--set", "train.epochs=2",
                     "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"localnet: {run} is in use by another localnet run (pid {os.getpid()}" in err
        assert "checkpoint is kept" not in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK} == held
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert train(small("rule.name=fa", "train.epochs=2"), run, resume=True,
                 progress=False)["epochs"] == 2  # free again once the holder let go


def test_a_run_directory_held_by_a_killed_run_is_free(tmp_path):
    """kill -9 runs no cleanup, and leaves the lock file with the dead pid in it; the
    kernel dropped the lock with the process, so the next run gets the directory.  (The
    directory's name has braces: the refusal names it as it is.)"""
    tmp_path = tmp_path / "{braces} in a name"
    tmp_path.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from localnet.files import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        said = re.escape(f"{tmp_path} is in use") + f".*pid {holder.pid} on "
        with pytest.raises(RunInUseError, match=said):
            with run_lock(tmp_path):
                pass
        # what `localnet report` reads: the holder, alive
        assert lock_holder(tmp_path) == {"pid": holder.pid, "host": socket.gethostname(),
                                         "since": ANY, "alive": True}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert f"pid {holder.pid} " in (tmp_path / LOCK).read_text()  # left behind
    assert lock_holder(tmp_path)["alive"] is False  # ... by a process that is gone
    with run_lock(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / LOCK).read_text()
        assert lock_holder(tmp_path)["alive"] is True
    assert not (tmp_path / LOCK).exists() and lock_holder(tmp_path) is None


def test_a_resume_says_where_it_goes_on_and_that_the_run_before_was_killed(tmp_path, capsys):
    """A lock file left by a process that is gone: the run before died without a word
    (kill -9, out of memory), so the steps it took after its checkpoint come again."""
    run = tmp_path / "run"
    train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    steps = json.loads((run / "summary.json").read_text())["steps"]
    assert main(["run", "--resume", str(run), "--set", "train.epochs=2", "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"resumed at step {steps} of {2 * steps} (epoch 2 of 2), from the last checkpoint" in err
    assert "killed" not in err  # it ended as it should, and took its lock file with it
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (run / LOCK).write_text(f"pid {gone} on {socket.gethostname()}, since 2026-12-01 10:00:00")
    assert main(["run", "--resume", str(run), "--set", "train.epochs=3", "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"resumed at step {2 * steps} of {3 * steps} (epoch 3 of 3), from the last "
            f"checkpoint; the process before (pid {gone}, since 2026-12-01 10:00:00) was "
            f"killed outright") in err


def test_reading_who_holds_a_run_directory_never_takes_its_lock(tmp_path, monkeypatch):
    """Had `localnet report` taken the lock to look, even for a moment, a run starting
    in that directory just then would have been refused as in use."""
    with run_lock(tmp_path):
        before = (tmp_path / LOCK).read_text()
        monkeypatch.setattr(fcntl, "flock", lambda *a: pytest.fail("flock called"))
        assert lock_holder(tmp_path)["alive"] is True
        monkeypatch.undo()
        assert (tmp_path / LOCK).read_text() == before
    # a holder on another host is named, not judged: this one cannot see its processes
    (tmp_path / LOCK).write_text("pid 7 on elsewhere.example, since 2026-12-01 10:00:00")
    assert lock_holder(tmp_path) == {"pid": 7, "host": "elsewhere.example",
                                     "since": "2026-12-01 10:00:00", "alive": None}


def test_a_state_file_that_cannot_be_written_names_it_and_keeps_the_old_one(tmp_path,
                                                                           monkeypatch):
    """torch.save's short write (a full disk) is a RuntimeError about "unexpected pos":
    it becomes an OSError naming the file and the free space there, and the file it was
    to replace is as it was."""
    path = tmp_path / "checkpoint.pt"
    save_state({"w": torch.ones(3)}, path)

    def short_write(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(path))} \(\[enforce fail.*"
                                      r"unexpected pos 64 vs 0; \d+ MB free there: a full disk"):
        save_state({"w": torch.zeros(3)}, path)
    assert torch.equal(load_state(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    with pytest.raises(OSError) as info:
        save_state({"w": torch.zeros(3)}, path)
    back = pickle.loads(pickle.dumps(info.value))  # how it leaves an actor
    assert type(back) is type(info.value) and str(back) == str(info.value)


def test_a_full_disk_is_reported_by_the_write_that_failed(tmp_path, monkeypatch):
    """When the checkpoint cannot be written, stopped.json cannot be either: the error
    the user sees is still the checkpoint's, naming its file."""
    import localnet.train as T
    from localnet.files import UnwritableError

    def full(state, path):
        raise UnwritableError(path, "No space left on device")

    def also_full(path, doc, indent=1):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "save_state", full)
    monkeypatch.setattr(T, "write_json", also_full)
    with pytest.raises(UnwritableError, match=re.escape(f"cannot write {tmp_path / 'checkpoint.pt'}")):
        train(small("train.epochs=1"), tmp_path, progress=False)


def test_counted_says_one_in_the_singular():
    assert [counted(n, "micro-batch") for n in (0, 1, 4)] == \
        ["0 micro-batches", "1 micro-batch", "4 micro-batches"]
    assert [counted(n, "actor") for n in (1, 11)] == ["1 actor", "11 actors"]
    assert [counted(n, "epoch") for n in (1, 2)] == ["1 epoch", "2 epochs"]
