"""benchmarks/gpu.py runs on any machine (`--device cpu`), so it cannot rot between the
sessions that are lent a GPU; it never needs one here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_on_the_cpu():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cpu", "--models", "resnet8", "--rules", "pfa", "--batch", "8",
                    "--warmup", "0", "--steps", "1", "--no-ray", "--no-write"])
    res = out["models"]["resnet8"]
    assert set(res["images_per_s"]) == {"plain", "inprocess:pfa"}
    assert all(v > 0 for v in res["images_per_s"].values())
    assert res["ratio_to_plain"]["plain"] == 1.0
    assert any("inprocess:pfa" in line for line in mod.report(out, _Args()))


class _Args:
    batch, steps, warmup, micro = 8, 1, 0, 4
