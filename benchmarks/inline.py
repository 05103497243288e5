"""The main job with and without inlining Ray payloads (`runtime.local_inline_bytes`), or
with other values of another runtime setting (`--key`).

    python benchmarks/inline.py                          # 3 rounds: null, then 2200000
    python benchmarks/inline.py --values null,1200000,2200000 --rounds 2 --no-write
    python benchmarks/inline.py --key local_shm_bytes --values null,65536

Runs `localnet run configs/resnet_pfa.yaml` (11 actors, 1f1b, 4 micro-batches of 32) on a
short CIFAR-10 subset once per value per round, the values in turn, and reads the
throughput each run reports (`summary.json`: samples_per_s, training steps only).  This
machine's speed drifts by 10-30% within minutes, so each value is compared with the run of
the first value in the same round, and the ratios' median is reported.  Results go to
benchmarks/RESULTS.md between <!-- inline --> markers (<!-- main-job:KEY --> for
another --key; --no-write: not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import commit, hardware_cpu, write_section  # noqa: E402

SHORT = ["data.subset=5000", "train.epochs=1", "data.test_subset=500", "metrics.alignment_every=0"]


def run_once(key: str, value: str, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "localnet", "run", "--no-progress", "configs/resnet_pfa.yaml",
           "--out", str(out)]
    for s in SHORT + [f"runtime.{key}={value}"]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"samples_per_s": summary["samples_per_s"], "wall_s": wall}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", default="local_inline_bytes", help="the runtime setting varied")
    p.add_argument("--values", default="null,2200000",
                   help="its values, the first is the reference")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    runs: dict[str, list[dict]] = {v: [] for v in values}
    with tempfile.TemporaryDirectory(prefix="localnet-inline-") as tmp:
        for r in range(args.rounds):
            for v in values:
                res = run_once(args.key, v, Path(tmp) / f"{v}-{r}", args.timeout)
                runs[v].append(res)
                print(f"round {r + 1} {args.key}={v}: {res['samples_per_s']:.1f} "
                      f"samples/s ({res['wall_s']:.0f} s)", flush=True)
    ref = values[0]
    rows = []
    for v in values:
        ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[v], runs[ref])]
        rows.append({"value": v, "samples_per_s": [round(x["samples_per_s"], 1) for x in runs[v]],
                     "vs_ref": [round(x, 3) for x in ratios],
                     "vs_ref_median": round(statistics.median(ratios), 3)})
    result = {"hardware": hardware_cpu(), "commit": commit(), "reference": ref, "rows": rows,
              "command": "python benchmarks/inline.py " + " ".join(argv or sys.argv[1:])}
    if not args.no_write:
        title = ("with payloads inline" if args.key == "local_inline_bytes"
                 else "and its payloads' medium" if args.key == "local_shm_bytes" else "by")
        lines = [f"### The main job {title} (`runtime.{args.key}`)", "",
                 f"Hardware: {result['hardware']}.  Commit `{result['commit']}`.  Command: "
                 f"`{result['command'].strip()}`: `localnet run configs/resnet_pfa.yaml --set "
                 f"{' --set '.join(SHORT)}` (11 actors, 1f1b, 4 micro-batches of 32) once per "
                 f"value per round, in turn; samples/s as the run's summary.json reports it; "
                 f"each ratio against the `{ref}` run of the same round.", "",
                 f"| {args.key} | samples/s per round | ratio per round | median ratio |",
                 "| --- | --- | --- | --- |"]
        lines += [f"| {r['value']} | {', '.join(map(str, r['samples_per_s']))} | "
                  f"{', '.join(map(str, r['vs_ref']))} | {r['vs_ref_median']} |" for r in rows]
        write_section("inline" if args.key == "local_inline_bytes" else f"main-job:{args.key}",
                      lines)
    return result


if __name__ == "__main__":
    os.environ.setdefault("LOCALNET_DATA", str(ROOT.parent / "shared" / "data"))
    print(json.dumps(main()))
