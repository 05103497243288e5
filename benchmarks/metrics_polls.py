"""What serving metrics costs the coordinator: its time in the metrics polls between
training steps, over a Ray run of the main job with `metrics.port=0`.

    python benchmarks/metrics_polls.py                 # 6,400 images, one epoch
    python benchmarks/metrics_polls.py --set metrics.poll_every=5

Every `metrics.poll_every` steps the coordinator reads the actors' timings and ledgers
(`RunObserver.poll`).  A poll that waits for the answers waits for every batch issued
ahead of it, so the actors drain; one that asks and reads the answers at the next poll
only spends what issuing the calls takes, while the actors go on.  Prints, as JSON, each
poll's milliseconds between steps and their share of the training time (quote it with
this command and the commit).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from common import ROOT, commit, hardware_cpu, ray_benchmark_env

SHORT = ["data.subset=6400", "train.epochs=1", "data.test_subset=100",
         "metrics.alignment_every=0", "metrics.port=0"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override after the short run's own")
    args = ap.parse_args(argv)
    ray_benchmark_env()
    from localnet import metrics
    from localnet.config import load_config
    from localnet.train import train

    polls: list[tuple[float, bool]] = []  # (seconds, between steps)
    elsewhere = []  # inside an evaluation's or a probe's own poll (they drain anyway)
    obs = metrics.RunObserver

    def timed(poll):
        def call(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return poll(self, *a, **k)
            finally:
                polls.append((time.perf_counter() - t0, not elsewhere))
        return call

    def apart(method):
        def call(self, *a, **k):
            elsewhere.append(1)
            try:
                return method(self, *a, **k)
            finally:
                elsewhere.pop()
        return call
    # by caller, not by poll's arguments: the same script times a commit from before
    # polls stopped waiting (copied into its checkout, whose localnet it then imports)
    obs.poll = timed(obs.poll)
    obs.eval_begin, obs.untimed = apart(obs.eval_begin), apart(obs.untimed)
    cfg = load_config(str(ROOT / "configs/resnet_pfa.yaml"), SHORT + args.set)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(cfg, run_dir, progress=False)
    between = [s for s, b in polls if b]
    result = {"hardware": hardware_cpu(), "commit": commit(),
              "command": " ".join(["python benchmarks/metrics_polls.py", *sys.argv[1:]]),
              "samples_per_s": round(summary["samples_per_s"], 1),
              "train_s": round(summary["train_s"], 2),
              "between_steps_ms": [round(s * 1e3, 1) for s in between],
              "share_of_training": round(sum(between) / summary["train_s"], 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
