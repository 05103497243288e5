"""Where the whole machine's CPU goes while the main job trains on Ray, by Linux perf.

    python benchmarks/machine_profile.py                              # per unit (11 actors)
    python benchmarks/machine_profile.py --set runtime.partition=per_layer --after 40 --tag per-layer

The actors' own CPU account (summary.json `runtime.actor_cpu_s`) times their main threads
by part; it cannot see inside a part (how much of "compute" is the Python interpreter),
nor gloo's I/O threads, Ray's daemons or the kernel's TCP path, and py-spy's samples
lean toward threads in system calls.  `perf record -a` samples every core at a fixed rate
whatever runs there, so its shares add up to the machine.

Starts `localnet run configs/resnet_pfa.yaml` (main_job.py's short run, on 12800 images so
that the training outlasts the window), records `perf record -a -g` for --seconds from
--after seconds on, and sorts the samples: the actors' compute kernels (libtorch_cpu and
oneDNN's generated code), their Python interpreter, their other libraries, their kernel
time, gloo's I/O threads, the coordinator, everything else, idle; and machine-wide the
kernel's TCP sends and receives and the bytes' copies inside them.  The window must lie in
the training (start-up and evaluation look different); the run's own summary says when it
trained, and a window outside it is an error.  Needs `perf` (Debian: linux-perf) and the
right to sample every CPU (root, or kernel.perf_event_paranoid <= 0).  Results go to
benchmarks/RESULTS.md between <!-- machine-profile:TAG --> markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import shutil
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

ROWS = ("actors: compute kernels", "actors: Python interpreter", "actors: other libraries",
        "actors: kernel", "gloo I/O threads", "coordinator", "everything else", "idle")
COMPUTE = ("libtorch_cpu", "[JIT]", "libgomp", "mkl")
KERNEL_PATHS = {"TCP sends and receives (writev, recvfrom)": ("do_writev", "__sys_recvfrom"),
                "the bytes' copies in them": ("_copy_from_iter", "_copy_to_iter")}


def row_of(comm: str, dso: str) -> str:
    """Which row a sample of thread `comm` in object `dso` counts in."""
    if comm.startswith("ray::StageWorke"):  # the kernel truncates names to 15 characters
        if any(k in dso for k in COMPUTE):
            return ROWS[0]
        if "libpython" in dso:
            return ROWS[1]
        return ROWS[3] if "kernel" in dso else ROWS[2]
    if comm.startswith("gloo_tcp"):
        return ROWS[4]
    if comm == "python":
        return ROWS[5]
    return ROWS[7] if comm == "swapper" else ROWS[6]


def _report(data: Path, *args: str) -> list[tuple[float, list[str]]]:
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none", *args],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if parts and not line.startswith("#") and parts[0].endswith("%"):
            rows.append((float(parts[0].rstrip("%")), parts[1:]))
    return rows


def shares(data: Path) -> dict[str, float]:
    """Percent of all samples per row, and per kernel path (any thread)."""
    out: Counter = Counter()
    for pct, rest in _report(data, "--no-children", "--sort", "comm,dso"):
        out[row_of(rest[0], " ".join(rest[1:]))] += pct
    for pct, rest in _report(data, "--children", "--sort", "sym"):
        # rest: self%, [k], symbol
        for name, syms in KERNEL_PATHS.items():
            if len(rest) >= 3 and rest[2] in syms:
                out[name] += pct
    return {k: round(out[k], 2) for k in (*ROWS, *KERNEL_PATHS)}


def profile(sets: list[str], after: float, seconds: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="localnet-profile-") as tmp:
        run_dir, data = Path(tmp) / "run", Path(tmp) / "perf.data"
        cmd = [sys.executable, "-m", "localnet", "run", "--no-progress",
               "configs/resnet_pfa.yaml", "--out", str(run_dir)]
        for s in SHORT + ["data.subset=12800"] + sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        time.sleep(after)
        w0 = time.perf_counter() - t0
        subprocess.run(["perf", "record", "-a", "-g", "-o", str(data), "sleep", str(seconds)],
                       capture_output=True, check=True)
        w1 = time.perf_counter() - t0
        _, err = run.communicate(timeout=timeout)
        end = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"the run failed ({run.returncode}):\n{err[-2000:]}")
        s = json.loads((run_dir / "summary.json").read_text())
        # wall_s runs from the training's start (the actors ready, the data loaded) to
        # the summary; the training took train_s of it
        start = end - s["wall_s"]
        if not start <= w0 < w1 <= start + s["train_s"]:
            raise SystemExit(f"the window {w0:.0f}-{w1:.0f} s is not inside the training "
                             f"(about {start:.0f}-{start + s['train_s']:.0f} s after the "
                             f"start): give --after (and --seconds) to fit it")
        return {"shares": shares(data), "window_s": [round(w0, 1), round(w1, 1)],
                "samples_per_s": round(s["samples_per_s"], 1), "actors": s["runtime"]["actors"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="resnet-pfa", help="the RESULTS.md section's tag")
    p.add_argument("--after", type=float, default=30.0,
                   help="seconds from the run's start to the window (after start-up)")
    p.add_argument("--seconds", type=float, default=8.0, help="the window's length")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt install linux-perf)")
    r = profile(args.set, args.after, args.seconds, args.timeout)
    r.update(hardware=hardware_cpu(), commit=commit(),
             command="python benchmarks/machine_profile.py " + " ".join(argv or sys.argv[1:]))
    for k, v in r["shares"].items():
        print(f"{v:6.2f}%  {k}")
    print(json.dumps(r))
    if not args.no_write:
        sets = "".join(f" --set {s}" for s in SHORT + ["data.subset=12800"] + args.set)
        lines = [f"### Where the machine's CPU goes on Ray, by perf ({args.tag})", "",
                 f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: "
                 f"`{r['command'].strip()}`: `perf record -a -g` for {args.seconds:g} s, "
                 f"{r['window_s'][0]}-{r['window_s'][1]} s into `localnet run "
                 f"configs/resnet_pfa.yaml{sets}` ({r['actors']} actors, "
                 f"{r['samples_per_s']} samples/s), inside its training.  Percent of all "
                 f"samples, the whole machine; the last two rows count any thread and "
                 f"overlap the others (gloo's I/O threads do most of the receives).", "",
                 "| where | share of the machine |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f}% |" for k, v in r["shares"].items()]
        write_section(f"machine-profile:{args.tag}", lines)
    return r


if __name__ == "__main__":
    main()
