"""What every benchmark records next to its numbers: the machine and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout finds localnet
    sys.path.insert(0, str(ROOT))


def ray_benchmark_env() -> None:
    """Set before Ray starts, by a benchmark that compares Ray actors with an in-process
    run: no usage stats, and Ray's workers at the driver's niceness.  Ray runs them at
    nice 15, the in-process baseline runs at 0: compare like with like (and do not let
    other jobs on a shared machine starve only the actors)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")


def hardware_cpu() -> str:
    """CPU model, cores, torch and Python versions."""
    import torch

    from localnet.timing import cpu_kind

    return (f"{cpu_kind()['model']}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=10).stdout.strip()


def _head() -> str:
    """The short hash of HEAD, "+changes" when the code measured is not that commit's
    (edits to localnet/, configs/ or a benchmark script); "unknown" outside git."""
    try:
        head = _git("rev-parse", "--short", "HEAD") or "unknown"
        edited = _git("status", "--porcelain", "--", "localnet", "configs", "benchmarks/*.py")
        return head + ("+changes" if edited and head != "unknown" else "")
    except Exception:  # noqa: BLE001
        return "unknown"


# read as the benchmark starts: a commit made while it runs (they take minutes) is not
# the code it measured
_HEAD = _head()


def commit() -> str:
    """The commit the benchmark's code came from, read as it started (`_head`)."""
    return _HEAD


def write_section(tag: str, lines: list[str]) -> None:
    """Put `lines` into benchmarks/RESULTS.md between <!-- tag --> and <!-- /tag -->
    (replacing what was there, or appended)."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    section = "\n".join([start, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    a, b = text.find(start), text.find(end)
    if a >= 0 and b > a:
        text = text[:a] + section + text[b + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def used_mb() -> float:
    """The machine's used memory, MB: MemTotal - MemAvailable."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


class Peak:
    """The machine's peak used memory while it runs, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.peak, self._stop = used_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every):
        while not self._stop.wait(every):
            self.peak = max(self.peak, used_mb())

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak
