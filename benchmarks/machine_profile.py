"""Where the whole machine's CPU goes while the main job trains on Ray, by Linux perf.

    python benchmarks/machine_profile.py                              # per unit (11 actors)
    python benchmarks/machine_profile.py --set runtime.partition=per_layer --tag per-layer
    python benchmarks/machine_profile.py --set runtime.executor=inprocess --tag inprocess

The actors' own CPU account (summary.json `runtime.actor_cpu_s`) times their main threads
by part; it cannot see inside a part (how much of "compute" is the Python interpreter),
nor gloo's I/O threads, Ray's daemons or the kernel's TCP path, and py-spy's samples
lean toward threads in system calls.  `perf record -a` samples every core at a fixed rate
whatever runs there, so its shares add up to the machine.

Runs `localnet run configs/resnet_pfa.yaml` (main_job.py's short run, on 12800 images)
under `perf record -a -g` and `perf stat -a`, and keeps the samples of its training only
(start-up and evaluation look different): the run's own summary.json says when it
trained, so the window is cut afterwards, by perf's timestamps (CLOCK_MONOTONIC).  It
sorts the samples: the actors' compute kernels (libtorch_cpu and oneDNN's generated
code), their Python interpreter, their other libraries, their kernel time, gloo's I/O
threads, the coordinator, everything else, idle; and machine-wide the kernel's TCP sends
and receives and the bytes' copies inside them.  The in-process run, the ratios'
denominator, is sorted the same way into its process's rows, with OpenMP's runtime apart
from the compute (its threads wait there for each other).  It also counts, per training
step, the kernel's context switches, migrations between cores and page faults.  Needs `perf`
(Debian: linux-perf) and the right to sample every CPU (root, or
kernel.perf_event_paranoid <= 0).  Results go to
benchmarks/RESULTS.md between <!-- machine-profile:TAG --> markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import commit, hardware_cpu, write_section  # noqa: E402
from main_job import SHORT  # noqa: E402

from localnet.config import load_run_config  # noqa: E402

# main_job.py's short run, over one epoch of twice its images: one epoch, so the run ends
# (main_job.py sets its epochs itself), and long enough for a window well inside it
RUN = SHORT + ["data.subset=12800", "train.epochs=1"]

ROWS = ("actors: compute kernels", "actors: Python interpreter", "actors: other libraries",
        "actors: kernel", "gloo I/O threads", "coordinator", "everything else", "idle")
# the in-process run (`--set runtime.executor=inprocess`): one process trains on every
# core, its torch threads meeting at OpenMP's barrier after each operator, where the
# threads that finished first wait -- in libgomp, which the actors (one thread each)
# barely enter; so it gets a row of its own there
ROWS_INPROCESS = ("process: compute kernels", "process: OpenMP runtime (libgomp)",
                  "process: Python interpreter", "process: other libraries",
                  "process: kernel", "everything else", "idle")
COMPUTE = ("libtorch_cpu", "[JIT]", "libgomp", "mkl")
# the kernel's own counts, which need no hardware counters (a VM has none): how often a
# core switched threads, moved a thread to the other core, or mapped a fresh page
EVENTS = ("context-switches", "cpu-migrations", "page-faults")
KERNEL_PATHS = {"TCP sends and receives (writev, recvfrom)": ("do_writev", "__sys_recvfrom"),
                "the bytes' copies in them": ("_copy_from_iter", "_copy_to_iter")}


def row_of(comm: str, dso: str, inprocess: bool = False) -> str:
    """Which row a sample of thread `comm` in object `dso` counts in."""
    if inprocess:
        if comm == "swapper":
            return ROWS_INPROCESS[6]
        if not comm.startswith("python"):  # the training process and its torch threads
            return ROWS_INPROCESS[5]
        if "libgomp" in dso:
            return ROWS_INPROCESS[1]
        if any(k in dso for k in COMPUTE):
            return ROWS_INPROCESS[0]
        if "libpython" in dso:
            return ROWS_INPROCESS[2]
        return ROWS_INPROCESS[4] if "kernel" in dso else ROWS_INPROCESS[3]
    if comm.startswith("ray::StageWorke"):  # the kernel truncates names to 15 characters
        if any(k in dso for k in COMPUTE):
            return ROWS[0]
        if "libpython" in dso:
            return ROWS[1]
        return ROWS[3] if "kernel" in dso else ROWS[2]
    if comm.startswith("gloo_tcp"):
        return ROWS[4]
    if comm.startswith("python"):  # the coordinator: `python -m localnet run`
        return ROWS[5]
    return ROWS[7] if comm == "swapper" else ROWS[6]


def _report(data: Path, window: str, *args: str) -> list[tuple[float, list[str]]]:
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none",
                          "--time", window, *args],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if parts and not line.startswith("#") and parts[0].endswith("%"):
            rows.append((float(parts[0].rstrip("%")), parts[1:]))
    return rows


def shares(data: Path, window: str, inprocess: bool = False) -> dict[str, float]:
    """Percent of all samples in `window` ("start,stop", perf's seconds) per row, and per
    kernel path (any thread)."""
    out: Counter = Counter()
    for pct, rest in _report(data, window, "--no-children", "--sort", "comm,dso"):
        out[row_of(rest[0], " ".join(rest[1:]), inprocess)] += pct
    for pct, rest in _report(data, window, "--children", "--sort", "sym"):
        # rest: self%, [k], symbol
        for name, syms in KERNEL_PATHS.items():
            if len(rest) >= 3 and rest[2] in syms:
                out[name] += pct
    return {k: round(out[k], 2) for k in (*(ROWS_INPROCESS if inprocess else ROWS),
                                          *KERNEL_PATHS)}


def _window(run_dir: Path, clock_offset: float, seconds: float | None) -> tuple[float, float]:
    """The run's training as CLOCK_MONOTONIC seconds (perf's clock here): summary.json is
    written `wall_s` after the training's start (the actors ready, the data loaded), and
    the training took `train_s` of that.  Its first and last tenth are left out (the
    pipeline filling, the last batch draining into evaluation); `seconds` narrows it to
    that much around its middle."""
    s = json.loads((run_dir / "summary.json").read_text())
    start = (run_dir / "summary.json").stat().st_mtime - s["wall_s"] - clock_offset
    a, b = start + 0.1 * s["train_s"], start + 0.9 * s["train_s"]
    if seconds is not None and seconds < b - a:
        mid = (a + b) / 2
        a, b = mid - seconds / 2, mid + seconds / 2
    if b - a < 2.0:
        raise SystemExit(f"the training lasted {s['train_s']:.1f} s, too short to profile: "
                         f"give it more images (--set data.subset=...)")
    return a, b


def counts(stat_csv: str, a: float, b: float, started: float) -> dict[str, float]:
    """Each software event's count over [a, b] (monotonic s), from `perf stat -I` lines
    (time since perf started, count, unit, event, ...), by the intervals that end in it."""
    out: Counter = Counter()
    for line in stat_csv.splitlines():
        f = line.split(",")
        if len(f) < 4 or line.startswith("#"):
            continue
        try:
            t, n = started + float(f[0]), float(f[1])
        except ValueError:
            continue  # "<not counted>" and the like
        if a < t <= b + 0.5:
            out[f[3]] += n
    return dict(out)


def profile(sets: list[str], seconds: float | None, freq: int, timeout: float) -> dict:
    """Sample the whole machine while the run lives, then keep only its training: where
    start-up ends is known only afterwards (summary.json), so no window is guessed
    ahead of the run."""
    with tempfile.TemporaryDirectory(prefix="localnet-profile-") as tmp:
        run_dir, data = Path(tmp) / "run", Path(tmp) / "perf.data"
        cmd = [sys.executable, "-m", "localnet", "run", "--no-progress",
               "configs/resnet_pfa.yaml", "--out", str(run_dir)]
        for s in RUN + sets:
            cmd += ["--set", s]
        # perf's samples carry CLOCK_MONOTONIC times; the summary's mtime is wall time
        offset = time.time() - time.monotonic()
        rec = subprocess.Popen(["perf", "record", "-a", "-g", "-F", str(freq), "-k",
                                "CLOCK_MONOTONIC", "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stat_started = time.monotonic()
        stat = subprocess.Popen(["perf", "stat", "-a", "-I", "500", "-x", ",", "-e",
                                 ",".join(EVENTS)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            run = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, timeout=timeout)
        finally:
            for proc in (rec, stat):
                proc.send_signal(signal.SIGINT)
            rec_err = rec.communicate(timeout=120)[1]
            stat_csv = stat.communicate(timeout=60)[1]
        if run.returncode != 0:
            raise SystemExit(f"the run failed ({run.returncode}):\n{run.stderr[-2000:]}")
        if rec.returncode not in (0, -signal.SIGINT) or not data.exists():
            raise SystemExit(f"perf record failed: {rec_err[-1000:]}")
        a, b = _window(run_dir, offset, seconds)
        s = json.loads((run_dir / "summary.json").read_text())
        cfg, _ = load_run_config(run_dir)
        steps = (b - a) * s["samples_per_s"] / cfg.train.batch_size
        events = counts(stat_csv, a, b, stat_started)
        inprocess = s["runtime"]["executor"] == "inprocess"
        return {"shares": shares(data, f"{a:.6f},{b:.6f}", inprocess), "inprocess": inprocess,
                "window_s": round(b - a, 1), "train_s": round(s["train_s"], 1),
                "per_step": {e: round(events.get(e, 0.0) / steps, 1) for e in EVENTS},
                "samples_per_s": round(s["samples_per_s"], 1), "actors": s["runtime"]["actors"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="resnet-pfa", help="the RESULTS.md section's tag")
    p.add_argument("--seconds", type=float, default=None,
                   help="the window's length, around the training's middle (default: all "
                        "of it but its first and last tenth)")
    p.add_argument("--freq", type=int, default=999, help="samples per second per core")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt install linux-perf)")
    r = profile(args.set, args.seconds, args.freq, args.timeout)
    r.update(hardware=hardware_cpu(), commit=commit(),
             command="python benchmarks/machine_profile.py " + " ".join(argv or sys.argv[1:]))
    for k, v in r["shares"].items():
        print(f"{v:6.2f}%  {k}")
    for k, v in r["per_step"].items():
        print(f"{v:8.1f}  {k} per training step")
    print(json.dumps(r))
    if not args.no_write:
        sets = "".join(f" --set {s}" for s in RUN + args.set)
        where, who = (("in one process", "one process") if r["inprocess"] else
                      ("on Ray", f"{r['actors']} actors"))
        lines = [f"### Where the machine's CPU goes {where}, by perf ({args.tag})", "",
                 f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: "
                 f"`{r['command'].strip()}`: `perf record -a -g` at {args.freq} Hz per core "
                 f"through `localnet run configs/resnet_pfa.yaml{sets}` ({who}, "
                 f"{r['samples_per_s']} samples/s), of which {r['window_s']} s in "
                 f"the middle of its {r['train_s']} s of training count.  Percent of all "
                 f"samples, the whole machine; the two rows in italics count any thread and "
                 f"overlap the others (on Ray, gloo's I/O threads do most of the receives).  The "
                 f"second table: the kernel's counts over the same seconds (`perf stat "
                 f"-a`) per training step.", "",
                 "| where | share of the machine |", "| --- | --- |"]
        lines += [f"| {'*' + k + '*' if k in KERNEL_PATHS else k} | {v:.1f}% |"
                  for k, v in r["shares"].items()]
        lines += ["", "| the kernel's count | per training step |", "| --- | --- |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in r["per_step"].items()]
        write_section(f"machine-profile:{args.tag}", lines)
    return r


if __name__ == "__main__":
    main()
