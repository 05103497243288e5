"""Deep networks with every layer (or block) an actor, on this box: do they train, or does
the memory preflight refuse them before any actor starts?

    python benchmarks/deep.py                          # every row below
    python benchmarks/deep.py --rows resnet44-per_layer --no-write

Each row is `localnet run configs/resnet_pfa.yaml` on Ray (PFA, 1f1b, 4 micro-batches of
32) with the row's settings, as a user would run it.  While it runs, the machine's used
memory (MemTotal - MemAvailable) is sampled every 0.2 s; the peak is reported beside the
idle machine's use before the run.  From the run directory: samples/s, start-up, the
preflight's estimate, the training loss every 10 steps (steps.jsonl) and the test
accuracy.  A refused row reports the preflight's message; any other failure is a failure
of the benchmark.  ResNet-50 runs on a synthetic image folder of 64x64 images that this
script writes (random pixels, so its loss need not fall).  Results go to
benchmarks/RESULTS.md between <!-- deep --> markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import Peak, commit, hardware_cpu, used_mb, write_section  # noqa: E402

CIFAR = ["data.name=cifar10", "data.test_subset=1000"]
# at 0.1 from the first step these depths fall to a constant output (RESULTS.md, "Notes: a
# warm-up for deep ResNets"), so the rate ramps up over the short epoch's steps
WARM_10K, WARM_5K = "train.lr_warmup_steps=78", "train.lr_warmup_steps=40"
ROWS = {  # name -> settings
    "resnet44-per_layer": ["model.name=resnet44", "runtime.partition=per_layer",
                           "data.subset=10000", WARM_10K, *CIFAR],
    "resnet56-per_layer": ["model.name=resnet56", "runtime.partition=per_layer",
                           "data.subset=10000", WARM_10K, *CIFAR],
    "resnet110-per_unit": ["model.name=resnet110", "runtime.partition=per_unit",
                           "data.subset=5120", WARM_5K, *CIFAR],
    # lr 0.01: He et al. (2016, sec. 4.2) found 0.1 too large for ResNet-110 to start
    # converging and warmed up at 0.01; one short epoch stays there
    "resnet110-stages16": ["model.name=resnet110", "runtime.partition={stages: 16}",
                           "train.lr=0.01", "data.subset=5120", *CIFAR],
    # 64x64 keeps the activations small; PFA's feedback weights (r = 10) stay large
    "resnet50-per_layer-64px": ["model.name=resnet50", "runtime.partition=per_layer",
                                "data.name=imagefolder", "data.image_size=64"],
}


def image_folder(root: Path, per_class: int = 32, classes: int = 4) -> Path:
    """train/ and val/ of random 64x64 PNGs (what `data.name=imagefolder` reads)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 4)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def run_row(name: str, sets: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "localnet", "run", "--no-progress", "configs/resnet_pfa.yaml",
           "--out", str(out), "--set", "train.epochs=1", "--set", "metrics.alignment_every=10"]
    for s in sets:
        cmd += ["--set", s]
    idle = used_mb()
    peak, t0 = Peak(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall, top = time.perf_counter() - t0, peak.stop()
    row = {"row": name, "sets": sets, "wall_s": round(wall), "idle_gb": round(idle / 1024, 1),
           "peak_gb": round(top / 1024, 1), "returncode": proc.returncode}
    if proc.returncode != 0:
        if "Nothing was started" not in proc.stderr:  # not the preflight: a real failure
            raise RuntimeError(f"{name}: {' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        msg = next(ln for ln in proc.stderr.splitlines() if "Nothing was started" in ln)
        return {**row, "refused": msg.strip()}
    s = json.loads((out / "summary.json").read_text())
    rt = s.get("runtime") or {}
    steps = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines() if ln]
    return {**row, "actors": rt.get("actors"), "samples_per_s": round(s["samples_per_s"], 1),
            "startup_s": round(rt.get("startup_s") or 0, 1),
            "estimate_mb": (rt.get("memory_estimate") or {}).get("total_mb"),
            "losses": [(d["step"], round(d["loss"], 3)) for d in steps],
            "train_loss": round(s["train_loss"], 3), "test_accuracy": s["test_accuracy"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"some of: {', '.join(ROWS)}")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every row (after the row's own)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="localnet-deep-") as tmp:
        folder = None
        for name in args.rows.split(","):
            if name not in ROWS:
                p.error(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
            sets = list(ROWS[name]) + args.set
            if "data.name=imagefolder" in sets:
                folder = folder or image_folder(Path(tmp) / "images")
                sets.append(f"data.root={folder}")
            rows.append(run_row(name, sets, Path(tmp) / name, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    result = {"hardware": hardware_cpu(), "commit": commit(), "rows": rows,
              "command": "python benchmarks/deep.py " + " ".join(argv or sys.argv[1:])}
    if not args.no_write:
        write(result)
    return result


def write(r: dict) -> None:
    lines = ["### Deep networks on this box: every layer (or block) an actor", "",
             f"Hardware: {r['hardware']}, 24 GB.  Commit `{r['commit']}`.  Command: "
             f"`{r['command'].strip()}`: `localnet run configs/resnet_pfa.yaml --set "
             f"train.epochs=1 --set metrics.alignment_every=10` on an embedded Ray with each "
             f"row's settings (CIFAR-10 rows: `data.test_subset=1000`).  Peak: the machine's "
             f"used memory during the run (idle before it).  Loss: the training batch's, "
             f"every 10 steps.", "",
             "| row | settings | actors | peak used GB (idle) | preflight estimate (MB) | "
             "start-up (s) | samples/s | training loss, every 10 steps | test accuracy | "
             "wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in r["rows"]:
        sets = ", ".join(f"`{s}`" for s in x["sets"] if not s.startswith("data.root="))
        mem = f"{x['peak_gb']} ({x['idle_gb']})"
        if "refused" in x:
            lines.append(f"| {x['row']} | {sets} | — | {mem} | refused | — | — | — | — | "
                         f"{x['wall_s']} |")
            continue
        losses = " → ".join(f"{v}" for _, v in x["losses"])
        lines.append(f"| {x['row']} | {sets} | {x['actors']} | {mem} | {x['estimate_mb']} | "
                     f"{x['startup_s']} | {x['samples_per_s']} | {losses} | "
                     f"{100 * x['test_accuracy']:.1f}% | {x['wall_s']} |")
    for x in r["rows"]:
        if "refused" in x:
            lines += ["", f"{x['row']}, refused before any actor started: {x['refused']}"]
    write_section("deep", lines)


if __name__ == "__main__":
    os.environ.setdefault("LOCALNET_DATA", str(ROOT.parent / "shared" / "data"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(json.dumps(main()))
