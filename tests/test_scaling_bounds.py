"""benchmarks/scaling.py's bounds on Ray ÷ in-process: the arithmetic the issue's
ratios are argued with (RESULTS.md), checked against cases worked by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scaling import bounds  # noqa: E402


def test_a_ray_run_needing_the_in_process_cpu_can_match_it():
    # in-process: 0.2 s per batch on 2 cores; Ray needs 0.4 CPU-s, 0.1 of it the plane
    b = bounds(0.2, {"machine": 0.4, "compute": 0.25, "main_plane": 0.06, "gloo_io": 0.04},
               cores=2)
    assert b["all"] == pytest.approx(1.0)
    assert b["free_plane"] == pytest.approx(0.4 / 0.3, abs=1e-3)
    assert b["compute_only"] == pytest.approx(1.6)


def test_bounds_grow_as_costs_are_taken_away_and_with_cores():
    cpu = {"machine": 0.539, "compute": 0.371, "main_plane": 0.051, "gloo_io": 0.031}
    two, four = bounds(0.193, cpu, cores=2), bounds(0.193, cpu, cores=4)
    assert two["all"] < two["free_plane"] < two["compute_only"]
    assert all(four[k] == pytest.approx(2 * two[k], abs=2e-3) for k in two)
