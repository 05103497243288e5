"""Shared test fixtures."""

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _checkout_changes() -> set[str] | None:
    """The checkout's changed and untracked paths, as `git status` lists them; None
    where this is no git checkout (an unpacked sdist)."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(r.stdout.splitlines()) if r.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def the_checkout_is_left_as_found():
    """Tests write under their tmp_path only.  One that ran `localnet report` on two runs
    without --out wrote its default ./report into the checkout, and its figures were
    committed with the next change."""
    before = _checkout_changes()
    yield
    after = _checkout_changes()
    if before is not None and after is not None:
        new = sorted(after - before)
        assert not new, f"the tests wrote into the checkout (git status): {new}"


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it.  Tiny tensors gain nothing from a
    second intra-op thread and stall on its synchronisation on a busy 2-core machine; the
    runtime's actors also compute with one thread, so references match them bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
