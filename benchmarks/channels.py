"""Communication-restricted learning: accuracy against error bits per sample, per rule.

    python benchmarks/channels.py --setting mnist            # mlp 784-512-512-10, 1 epoch
    python benchmarks/channels.py --setting cifar10 --epochs 3 --subset 5000 --test-subset 1000
    python benchmarks/channels.py --setting mnist --jobs 2   # two points at once
    python benchmarks/channels.py --setting mnist --jobs 2 --seeds 3  # each point 3 times
    python benchmarks/channels.py --setting mnist --jobs 2 --seeds 3 --lr 0.005  # another rate

One `localnet sweep` per setting (resumable: rerun the same command to finish it):
rules bp, fa, kp, pfa, usf, dfa (--rules) x {every error codec, topk and sign with error
feedback, delay 1 and 4, drop 0.1 and 0.5, Gaussian noise 0.5 and 1 of each sample's
size}, one restriction at a time (`--vary`),
activations fp32.  Every point is a full training run in-process with a channel on every
unit boundary.

It writes the sweep's csv, md and png under benchmarks/runs/channels-<setting>, copies the
plot to benchmarks/channels_<setting>.png, and puts a section into benchmarks/RESULTS.md
(between <!-- channels:<setting> --> markers) with the issue's target for MNIST: with int8
errors every rule loses at most 0.5 points against fp32 while sending at most 26% of
fp32's error bytes.  The last line printed is a JSON object with those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import commit, hardware_cpu, write_section  # noqa: E402
from localnet.sweep import sweep  # noqa: E402

CODECS = "fp32,fp16,bf16,int8,topk,sign,ternary,lowrank"
# the two biased codecs again with the sender's memory, which mends their bias
# (localnet/channels/README.md, "What error feedback keeps")
FED = "{codec: topk, error_feedback: true},{codec: sign, error_feedback: true}"
CONFIGS = {"mnist": "configs/mnist_mlp.yaml", "cifar10": "configs/resnet_pfa.yaml"}
# resnet_pfa.yaml holds PFA's CIFAR recipe (per_rule); here it runs in-process, one batch
# at a time, so that each point is one ordinary process
EXTRA = {"mnist": [], "cifar10": ["runtime.executor=inprocess", "train.micro_batches=1"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(CONFIGS), default="mnist")
    p.add_argument("--rules", default="bp,fa,kp,pfa,usf,dfa")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--subset", type=int, default=None, help="training images (default: all)")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per point, seeds 0..N-1; the int8 check averages its cost "
                        "over them, seed by seed")
    p.add_argument("--lr", type=float, default=None,
                   help="train.lr for every rule (default: the config's); a table of its "
                        "own, where a rule's reference sits at the edge of its stable rate "
                        "at the config's")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/channels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sets = [f"train.epochs={args.epochs}", "train.threads=1", "metrics.alignment_every=0",
            *EXTRA[args.setting]]
    if args.subset:
        sets.append(f"data.subset={args.subset}")
    if args.test_subset:
        sets.append(f"data.test_subset={args.test_subset}")
    if args.lr is not None:
        sets.append(f"train.lr={args.lr:g}")
    grid = [f"rule.name={args.rules}"]
    if args.seeds > 1:  # (a sweep of its own: its points' names carry their seed)
        grid.append(f"seed={','.join(map(str, range(args.seeds)))}")
    out = HERE / "runs" / (f"channels-{args.setting}"
                           + (f"-{args.seeds}seeds" if args.seeds > 1 else "")
                           + (f"-lr{args.lr:g}" if args.lr is not None else ""))
    t0 = time.perf_counter()
    res = sweep(ROOT / CONFIGS[args.setting], grid, sets, out,
                log=lambda m: print(m, flush=True), jobs=args.jobs,
                vary_items=[f"channel.error.codec={CODECS}", f"channel.error={FED}",
                            "channel.error.delay=1,4", "channel.error.drop=0.1,0.5",
                            "channel.error.noise=0.5,1"])
    rows = res["rows"]
    # int8's cost against the fp32 point, seed by seed (localnet/sweep_tables.py): with
    # seeds, the mean and its standard error; a rule checks only where every pair finished
    checks = {}
    for c in res["costs"]:
        if c["restriction"] == "error.codec=int8" and c["pairs"] == f"{args.seeds}/{args.seeds}":
            checks[c["rule"]] = {"loss_points": round(c["points_lost"], 2),
                                 "se": None if c["se"] != c["se"] else round(c["se"], 2),
                                 "bytes_ratio": round(c["bits_ratio"], 4)}
    result = {"setting": args.setting, "int8_vs_fp32": checks,
              "int8_max_loss_points": max((c["loss_points"] for c in checks.values()), default=None),
              "int8_max_bytes_ratio": max((c["bytes_ratio"] for c in checks.values()), default=None),
              "targets": {"int8_max_loss_points": 0.5, "int8_max_bytes_ratio": 0.26},
              "points": len(rows), "failed": [r["point"] for r in rows if r["status"] != "ok"],
              "ran": len(res["ran"]), "wall_s": round(time.perf_counter() - t0, 1),
              "command": command, "sets": sets, "seeds": args.seeds, "lr": args.lr}
    png = HERE / f"channels_{out.name.removeprefix('channels-').replace('-', '_')}.png"
    if (out / "sweep.png").exists():
        shutil.copy(out / "sweep.png", png)
    if not args.no_write:
        table = (out / "sweep.md").read_text()
        if args.seeds > 1:
            # with seeds, their means: each run's row (3 times as many) stays in sweep.md;
            # the tables' key (what "error cos" is) comes along
            key = [line for line in table.splitlines() if line.startswith("error cos:")]
            table = "\n\n".join([table.split("\nEach run:")[0].strip(), *key])
        write_results(result, table, png.name)
    return result


def write_results(r: dict, table: str, png: str) -> None:
    seeds = r["seeds"]
    tag = (f"channels:{r['setting']}" + (f"-{seeds}seeds" if seeds > 1 else "")
           + (f"-lr{r['lr']:g}" if r["lr"] is not None else ""))
    c = r["int8_vs_fp32"]
    lines = [f"### Restricted error channels: {r['setting']}, accuracy vs error bits per sample"
             + (f", {seeds} seeds" if seeds > 1 else "")
             + (f", lr {r['lr']:g}" if r["lr"] is not None else ""),
             "",
             f"Hardware: {hardware_cpu()}.  Commit `{commit()}`.  Command: `{r['command'].strip()}` "
             f"(settings: {', '.join(r['sets'])}; "
             f"{f'seeds 0-{seeds - 1}, compared seed by seed' if seeds > 1 else 'one seed'}; "
             f"activations fp32; one restriction "
             f"at a time on every error edge).  Plot: `benchmarks/{png}`.",
             "", table.strip(), "",
             "int8 against fp32 errors, per rule (accuracy points lost"
             + (", with its standard error over the seeds" if seeds > 1 else "")
             + ", error-byte ratio): "
             + ", ".join(f"{k} {v['loss_points']:+.2f}"
                         + (f" ± {v['se']:.2f}" if v["se"] is not None else "")
                         + f" / {v['bytes_ratio']:.1%}" for k, v in c.items()) + ".",
             f"Largest loss {r['int8_max_loss_points']} points (target <= 0.5), largest byte "
             f"ratio {r['int8_max_bytes_ratio']} (target <= 0.26).  Negative loss means int8 "
             f"did better" + (" (noise of one seed)." if seeds == 1 else "."),
             ]
    write_section(tag, lines)


if __name__ == "__main__":
    os.environ.setdefault("LOCALNET_DATA", str(ROOT.parent / "shared" / "data"))
    print(json.dumps(main()))
