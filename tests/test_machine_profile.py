"""benchmarks/machine_profile.py's sorting of perf samples into the rows RESULTS.md
reads: one row per sample, and OpenMP's barrier kept apart from the in-process run's
compute (on Ray each actor has one thread, and its libgomp samples are compute)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from machine_profile import ROWS, ROWS_INPROCESS, row_of  # noqa: E402

SAMPLES = [("python", "libgomp.so.1"), ("python", "libtorch_cpu.so"), ("python", "[JIT] tid 7"),
           ("python", "libpython3.11.so.1.0"), ("python", "[kernel.kallsyms]"),
           ("python", "libc.so.6"), ("swapper", "[kernel.kallsyms]"), ("raylet", "raylet"),
           ("ray::StageWorke", "libgomp.so.1"), ("gloo_tcp_loop", "[kernel.kallsyms]"),
           ("python3", "libgomp.so.1")]


def test_the_in_process_run_sorts_openmp_apart_from_its_compute():
    rows = {s: row_of(*s, inprocess=True) for s in SAMPLES}
    assert set(rows.values()) <= set(ROWS_INPROCESS)
    assert rows[("python", "libgomp.so.1")] == rows[("python3", "libgomp.so.1")] \
        == "process: OpenMP runtime (libgomp)"
    assert rows[("python", "libtorch_cpu.so")] == rows[("python", "[JIT] tid 7")] \
        == "process: compute kernels"
    assert rows[("python", "libpython3.11.so.1.0")] == "process: Python interpreter"
    assert rows[("swapper", "[kernel.kallsyms]")] == "idle"
    # what runs beside it, whatever it is, is not the training's
    assert rows[("raylet", "raylet")] == rows[("gloo_tcp_loop", "[kernel.kallsyms]")] \
        == "everything else"


def test_on_ray_the_python_process_is_the_coordinator_and_actors_own_their_openmp():
    rows = {s: row_of(*s) for s in SAMPLES}
    assert set(rows.values()) <= set(ROWS)
    assert rows[("ray::StageWorke", "libgomp.so.1")] == "actors: compute kernels"
    assert {rows[s] for s in SAMPLES if s[0].startswith("python")} == {"coordinator"}
    assert rows[("gloo_tcp_loop", "[kernel.kallsyms]")] == "gloo I/O threads"
