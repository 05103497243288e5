"""Start-up of the main job's actors: all at once against a few at a time.

    python benchmarks/startup.py                       # 4 rounds, windows 0 and default
    python benchmarks/startup.py --windows 0,2,default --rounds 3 --no-write

Each round builds the main job's RayExecutor (configs/resnet_pfa.yaml) once per
`runtime.start_window` value, in turn, and closes it: its own embedded Ray each time,
so every trial starts as `localnet run` does.  A trial records the seconds until every
actor was ready (`startup_s`, ray.init included), the part spent starting the actors,
the CPU all the actors had used when ready, and the most actors that were starting at
one moment.  Interleaved, because this machine's speed drifts by minutes: compare the
medians of one run.  Results go to benchmarks/RESULTS.md between <!-- startup -->
markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import ROOT, commit, hardware_cpu, ray_benchmark_env, write_section

CONFIG = "configs/resnet_pfa.yaml"


def trial(window: str, sets: list[str]) -> dict:
    from localnet.config import load_config
    from localnet.runtime.ray_executor import RayExecutor

    extra = [] if window == "default" else [f"runtime.start_window={window}"]
    cfg = load_config(ROOT / CONFIG, sets + extra)
    ex = RayExecutor(cfg, (3, 32, 32), 10)
    try:
        return {"window": window, "startup_s": ex.startup_s,
                "actors_s": ex.startup_phases.get("actors_built"),
                "actor_cpu_s": sum(i["process_cpu_s"] for i in ex.stage_info),
                "at_once": ex.starting_at_once(), "actors": ex.num_stages}
    finally:
        ex.close()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", default="0,default",
                   help="runtime.start_window values, in turn each round (default: the cores + 1)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    ray_benchmark_env()
    windows = args.windows.split(",")
    trials: dict[str, list[dict]] = {w: [] for w in windows}
    for r in range(args.rounds):
        for w in windows:
            t = trial(w, args.set)
            trials[w].append(t)
            print(f"round {r + 1} window {w}: ready in {t['startup_s']:.1f} s (actors "
                  f"{t['actors_s']:.1f} s, their CPU {t['actor_cpu_s']:.1f} s, at most "
                  f"{t['at_once']} starting at once)", flush=True)
            time.sleep(2)  # Ray's processes gone before the next one starts

    def med(w, k):
        return round(statistics.median(t[k] for t in trials[w]), 1)

    result = {"hardware": hardware_cpu(), "commit": commit(), "sets": args.set,
              "actors": trials[windows[0]][0]["actors"],
              "rows": {w: {"startup_s": [round(t["startup_s"], 1) for t in ts],
                           "median_startup_s": med(w, "startup_s"),
                           "median_actors_s": med(w, "actors_s"),
                           "median_actor_cpu_s": med(w, "actor_cpu_s"),
                           "at_once": max(t["at_once"] for t in ts)}
                       for w, ts in trials.items()},
              "command": "python benchmarks/startup.py " + " ".join(argv or sys.argv[1:])}
    if not args.no_write:
        lines = ["### Start-up: the main job's actors all at once, or a few at a time", "",
                 f"Hardware: {result['hardware']}.  Commit `{result['commit']}`.  Command: "
                 f"`{result['command'].strip()}`: the RayExecutor of `{CONFIG}` "
                 f"({result['actors']} actors) built and closed once per window value, in "
                 f"turn, {args.rounds} rounds; each with its own embedded Ray.", "",
                 "| runtime.start_window | until every actor is ready, each trial (s) | "
                 "median | of which starting the actors (median, s) | the actors' CPU when "
                 "ready (median, s) | most starting at once |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for w, row in result["rows"].items():
            name = "the cores + 1 (default)" if w == "default" else ("all at once" if w == "0" else w)
            lines.append(f"| {name} | {', '.join(map(str, row['startup_s']))} | "
                         f"{row['median_startup_s']} | {row['median_actors_s']} | "
                         f"{row['median_actor_cpu_s']} | {row['at_once']} |")
        write_section("startup", lines)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
