"""Accuracy of every rule against the papers' figures.

    python benchmarks/reproduce.py --setting mnist                 # 40 epochs, PFA's MNIST setting
    python benchmarks/reproduce.py --setting cifar10 --epochs 3 --subset 10000   # what fits a CPU
    python benchmarks/reproduce.py --setting mnist --jobs 2 --rules bp fa
    python benchmarks/reproduce.py --setting mnist --jobs 2 --rules fa --seeds 0 1 2

Each (setting, rule, seed) is an ordinary `localnet run` into
benchmarks/runs/<setting>/<rule> (seed 0) or <rule>-seed<k>; finished runs (a summary.json
with the requested budget) are not rerun.  The table -- every rule with a finished run at
this budget, the mean over its seeds -- is written to benchmarks/RESULTS.md (between
markers, one section per setting) with the hardware, commit and command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import commit, hardware_cpu, write_section  # noqa: E402

# Published final test accuracy (%).  MNIST: read off the PFA paper's curves (Li & Benna
# 2024).  CIFAR-10 ResNet-20, 250 epochs: BioTorch's table (Sanfiz & Akrout 2021) for
# bp, fa, dfa, usf, brsf, frsf; the PFA paper for pfa and pfa-o.
PAPER = {
    "mnist": {"bp": 98.4, "fa": 98.2, "dfa": 98.2, "usf": 98.25, "pfa": 98.4, "pfa-o": 98.4},
    "cifar10": {"bp": 91.37, "fa": 67.84, "dfa": 54.06, "usf": 89.95, "brsf": 88.98,
                "frsf": 88.80, "pfa": 90.8, "pfa-o": 91.3},
}
SETTINGS = {
    "mnist": ("configs/mnist_mlp.yaml", 40),
    "cifar10": ("configs/resnet_pfa.yaml", 250),
}
RULES = ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm", "pfa", "pfa-o"]


def overrides(rule: str) -> list[str]:
    if rule == "pfa-o":
        return ["rule.name=pfa", "rule.ortho=true"]
    return [f"rule.name={rule}"]


def run_dir(setting: str, rule: str, seed: int, extra: list[str] = ()) -> Path:
    name = rule if seed == 0 else f"{rule}-seed{seed}"
    if extra:  # --set overrides: their own directories
        name += "__" + "__".join(e.replace("=", "-").replace("/", "_") for e in extra)
    return HERE / "runs" / setting / name


def finished(setting: str, rule: str, seed: int, epochs: int, subset: int | None,
             extra: list[str] = ()) -> dict | None:
    done = run_dir(setting, rule, seed, extra) / "summary.json"
    if done.exists():
        s = json.loads(done.read_text())
        if s.get("epochs") == epochs and s.get("budget", {}).get("subset") == subset:
            return s
    return None


def run_one(setting: str, rule: str, epochs: int, subset: int | None, threads: int,
            seed: int = 0, extra: list[str] = ()) -> dict:
    from localnet.config import load_config
    from localnet.train import train

    config, _ = SETTINGS[setting]
    # in-process: the papers' numbers are about the rules, not the runtime
    sets = overrides(rule) + [f"train.epochs={epochs}", f"train.threads={threads}",
                              f"seed={seed}", "runtime.executor=inprocess", *extra]
    if subset:
        sets.append(f"data.subset={subset}")
    out = run_dir(setting, rule, seed, extra)
    done = out / "summary.json"
    s = finished(setting, rule, seed, epochs, subset, extra)
    if s is not None:
        return s
    cfg = load_config(ROOT / config, sets)
    s = train(cfg, out, progress=False)
    s["budget"] = {"epochs": epochs, "subset": subset}
    done.write_text(json.dumps(s, indent=2) + "\n")
    print(f"{setting:8s} {rule:6s} seed {seed} {100 * s['test_accuracy']:.2f}%  "
          f"{s['wall_s']:.0f} s", flush=True)
    return s


def write_results(setting: str, results: dict, epochs: int, subset: int | None, command: str,
                  rev: str, tag: str | None = None):
    ref = PAPER[setting]
    name = {"mnist": "MNIST, mlp 784-512-512-10", "cifar10": "CIFAR-10 (JPEG q75 copy), ResNet-20"}[setting]
    budget = f"{epochs} epoch{'s' * (epochs != 1)}" + (
        f" on the first {subset} training images" if subset else "")
    full = SETTINGS[setting][1]
    short = epochs < full or subset  # the paper's figure is a reference, not a target
    paper_col = f"{full}-epoch reference (%)" if short else "paper (%) | difference"
    lines = [f"### Accuracy: {name}, {budget}", "",
             f"Hardware: {hardware_cpu()}.  Commit `{rev}`.  Command: `{command}`.  Test "
             f"accuracy is the mean over the seeds run, ± their standard deviation (each "
             f"seed's in the last column); the gap to BP is at this same budget.", "",
             f"| rule | test accuracy (%) | gap to bp | {paper_col} | samples/s | "
             "wall (s) | seeds: accuracy (%) |",
             "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (not short)]
    mean = {r: statistics.mean(100 * s["test_accuracy"] for s in runs.values())
            for r, runs in results.items()}
    for rule, runs in results.items():
        accs = [100 * s["test_accuracy"] for s in runs.values()]
        acc = mean[rule]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        gap = f"{acc - mean['bp']:+.2f}" if "bp" in mean and rule != "bp" else "—"
        paper = ref.get(rule)
        cell = "—" if paper is None else f"{paper}"
        if not short:
            cell += f" | {acc - paper:+.2f}" if paper is not None else " | —"
        s0 = next(iter(runs.values()))
        per = ", ".join(f"{k}: {100 * s['test_accuracy']:.2f}" for k, s in runs.items())
        lines.append(f"| {rule} | {acc:.2f}{spread} | {gap} | {cell} | "
                     f"{s0['samples_per_s']:.0f} | {s0['wall_s']:.0f} | {per} |")
    write_section(f"reproduce:{tag or setting}", lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    p.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    p.add_argument("--epochs", type=int, help="default: the paper's (MNIST 40, CIFAR 250)")
    p.add_argument("--subset", type=int, help="first N training samples only")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds per rule")
    p.add_argument("--tag", help="RESULTS.md section name (default: the setting); the table "
                                 "lists every rule with finished runs on disk")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (their own run directories)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    args = p.parse_args()
    epochs = args.epochs or SETTINGS[args.setting][1]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    rev = commit()  # the code the runs use, read before they start
    tic = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {(r, k): pool.submit(run_one, args.setting, r, epochs, args.subset, threads, k,
                                       args.set)
                   for r in args.rules for k in args.seeds}
        for f in futures.values():
            f.result()
    results = {}  # every rule with finished runs at this budget, all its seeds
    for r in RULES:
        runs = {k: s for k in range(10)
                if (s := finished(args.setting, r, k, epochs, args.subset, args.set)) is not None}
        if runs:
            results[r] = runs
    command = "python benchmarks/reproduce.py " + " ".join(sys.argv[1:])
    write_results(args.setting, results, epochs, args.subset, command, rev, args.tag)
    print(json.dumps({r: [round(100 * s["test_accuracy"], 2) for s in runs.values()]
                      for r, runs in results.items()}))
    print(f"total {time.time() - tic:.0f} s; table in {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
