"""benchmarks/gpu.py runs on any machine (`--device cpu`), so it cannot rot between the
sessions that are lent a GPU; it never needs one here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_on_the_cpu():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cpu", "--model", "resnet8", "--rules", "pfa", "--batch", "8",
                    "--warmup", "0", "--steps", "1", "--no-ray", "--no-write"])
    assert set(out["images_per_s"]) == {"plain", "inprocess:pfa"}
    assert all(v > 0 for v in out["images_per_s"].values())
    assert out["ratio_to_plain"]["plain"] == 1.0
