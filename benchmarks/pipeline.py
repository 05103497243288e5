"""Pipeline throughput: ResNet-20 with PFA on CPU, Ray stages against the in-process
executor with the same thread budget, and the simulator's prediction of it.

    python benchmarks/pipeline.py                  # the full run (about 5 minutes on 2 cores)
    python benchmarks/pipeline.py --quick          # a smoke run (about a minute)
    python benchmarks/pipeline.py --stages 1,2 --micro 4,8 --steps 6 --no-write

What it measures (synthetic CIFAR-shaped input, batch --batch, one torch thread per actor):

  framing      per-message overhead of the wire format (messages.py): header encode,
               payload wrap, decode and validation, in microseconds, for 4 KiB .. 1 MiB
               payloads; header bytes against payload bytes; and the time Ray takes to
               move the same payload actor to actor, so `framing_overhead_1mb` is framing
               time / 1 MiB transfer time
  ray          RayExecutor at S = 1, 2, 4 stages and M = 1, 4, 8 micro-batches, gpipe
               everywhere and async for S > 1; each run's partition balanced by the unit
               costs at its own micro-batch size (what `partition: {balance: cost}` does)
  in-process   InProcessExecutor at S torch threads (the thread budget of S
               single-threaded actors), on the whole batch and on the same M micro-batches.
               Timed in blocks that alternate with the Ray blocks of each row (--rounds),
               and every ratio is the median over rounds of Ray / the in-process blocks of
               its round: this machine's speed drifts by 10-30% within minutes, and a
               baseline timed minutes away from the run it divides says more about the
               drift than about the runtime
  simulator    `schedule.simulate` with the measured Ray hop curve (time and CPU by
               payload size) and the machine's core count, fed two ways (see `predict`):
               profiled -- the forward / backward / update costs the actors timed during
               the row's steps, and the Ray overhead per call measured in those steps --
               and a priori -- every unit timed alone in-process, one thread, and a tiny
               hop's CPU per call, as `localnet simulate` has before any run;
               error = |predicted - measured| / measured

The last line printed is a JSON object: sim_error_max (profiled costs;
sim_error_max_apriori for the a-priori ones), framing_overhead_1mb,
two_stage_vs_inprocess (2-stage async / in-process at 2 threads, best M), gpipe_vs_bound
(the issue's gpipe target: min over 1 < S <= cores and M of the gpipe ratio to in-process
at S threads / M/(M+S-1); gpipe_vs_bound_same_micro: the same with the in-process
executor on the same micro-batches; gpipe_vs_linear_bound: against S x the 1-thread
in-process throughput, i.e. perfect scaling), the targets, the load average, and every
row with the costs the simulator was fed.  Results are written to
benchmarks/RESULTS.md between <!-- pipeline --> markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from common import commit, hardware_cpu, ray_benchmark_env, write_section

ray_benchmark_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from localnet.alloc import keep_freed_memory  # noqa: E402
from localnet.builders import build_rule_and_model, optim_config  # noqa: E402
from localnet.config import Config  # noqa: E402
from localnet.engine import InProcessExecutor  # noqa: E402
from localnet.runtime.cost import measure_costs  # noqa: E402
from localnet.runtime.messages import Message, validate  # noqa: E402
from localnet.runtime.partition import balanced_boundaries  # noqa: E402
from localnet.runtime.plan import batches_ahead  # noqa: E402
from localnet.schedules import make_schedule, simulate  # noqa: E402
from localnet.timing import machine_busy_s  # noqa: E402

SHAPE, NC = (3, 32, 32), 10
TARGETS = {"sim_error_max": 0.15, "framing_overhead_1mb": 0.05,
           "two_stage_vs_inprocess": 0.9, "gpipe_vs_bound": 0.9}


# ------------------------------------------------------------------------------ helpers
class LoadSampler:
    """Samples the 1-minute load average every few seconds while the benchmark runs."""

    def __init__(self, every: float = 5.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every):
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        return {"start": round(self.samples[0], 2), "mean": round(statistics.mean(self.samples), 2),
                "max": round(max(self.samples), 2), "end": round(self.samples[-1], 2)}


RUNTIME: dict = {}  # runtime settings for every run (--allocator)


def cfg_for(schedule="gpipe", M=1, batch=64, partition="per_unit") -> Config:
    return Config.model_validate({
        "seed": 0, "rule": {"name": "pfa"}, "model": {"name": "resnet20"},
        "data": {"name": "synthetic"},
        "train": {"batch_size": batch, "micro_batches": M, "lr": 0.01, "momentum": 0.9,
                  "weight_decay": 1e-4},
        "runtime": {"executor": "ray", "schedule": schedule, "partition": partition,
                    "threads": 1, "timeout_s": 600, **RUNTIME}})


def data(batch: int, n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, *SHAPE, generator=g), torch.randint(0, NC, (batch,), generator=g))
            for _ in range(n)]


def hardware() -> str:
    import ray
    return f"{hardware_cpu()}, ray {ray.__version__}"


# ------------------------------------------------------------------------------ framing
def framing(reps: int) -> list[dict]:
    """Sender + receiver cost of the wire format (not the transport)."""
    out = []
    for nbytes in (4096, 65536, 1 << 20):
        t = torch.randn(nbytes // 4)
        ro = t.numpy().copy()
        ro.setflags(write=False)  # what the object store hands a receiver
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            m = Message.make("activation", t, src="stage0", dst="stage1", step=12, mb=3,
                             run="0123456789ab", detail="train")
            raw, _ = m.wire()
            r = Message.from_wire(raw, ro)
            validate(r, "activation", (None,), torch.float32, dst="stage1", step=12, mb=3)
            times.append(time.perf_counter() - t0)
        out.append({"payload_bytes": nbytes, "header_bytes": len(raw),
                    "framing_us": statistics.median(times) * 1e6})
    return out


def ray_transfer(reps: int, sizes=()) -> dict:
    """Ray on this machine: a no-op call's round trip; an actor's service time per call
    (many calls in flight, so the time per call is what it occupies the actor); and a
    hop -- a call whose argument is the previous call's result on another actor, as an
    activation or error travels -- with a tiny and with a 1 MiB payload."""
    import ray

    @ray.remote(num_cpus=0)
    class Node:
        def make(self, n):
            return np.ones(n, np.float32)

        def relay(self, a):
            return a

        def nop(self):
            return 0

    a, b = Node.remote(), Node.remote()
    ray.get([a.nop.remote(), b.nop.remote()], timeout=120)

    def med(fn, n=reps):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    call = med(lambda: ray.get(a.nop.remote(), timeout=60))
    service = med(lambda: ray.get([a.nop.remote() for _ in range(100)], timeout=60), 5) / 100

    def chain(size, hops=20):
        x = a.make.remote(size)
        ray.get(x, timeout=60)
        t0 = time.perf_counter()
        for i in range(hops):
            x = (b if i % 2 == 0 else a).relay.remote(x)
        ray.get(x, timeout=60)
        return (time.perf_counter() - t0) / hops

    def hop_at(nbytes):
        """(seconds per hop, CPU seconds per hop summed over every process)."""
        ts, cs = [], []
        for _ in range(5):
            c0 = machine_busy_s()
            ts.append(chain(max(nbytes // 4, 1)))
            cs.append(machine_busy_s() - c0)
        return statistics.median(ts), statistics.median(cs) / 20

    chain(1)
    hop, hop_cpu = hop_at(4)
    hop_1mb, _ = hop_at(1 << 20)
    # the payloads a pipeline step sends: a stage's output for batch/M samples
    curve = [(0, hop, hop_cpu)] + [(n, *hop_at(n)) for n in sizes]
    ray.kill(a)
    ray.kill(b)
    return {"call_us": call * 1e6, "service_us": service * 1e6, "hop_us": hop * 1e6,
            "hop_1mb_us": hop_1mb * 1e6, "service_s": service, "hop_s": hop,
            "transfer_1mb_s": hop_1mb, "curve": curve}


def interp(curve, nbytes: float, col: int) -> float:
    """Piecewise-linear in bytes through the measured (bytes, hop_s, cpu_s) points."""
    pts = sorted(curve)
    return float(np.interp(nbytes, [c[0] for c in pts], [c[col] for c in pts]))


# ------------------------------------------------------------------------------ simulator
def predict(schedule, S, M, f, b, u, boundary_bytes, tr, cores, batch, per_hop=None,
            ahead=0):
    """Samples/s that `schedule.simulate` predicts from per-stage costs f, b, u (seconds
    per forward / backward / update call) and the measured Ray hop curve `tr`.

    Every message between stages costs `per_hop` seconds of CPU on top of the compute
    (the data plane's frame, payload and receive, and the coordinator's share), charged
    to the action that receives it.  Profiled: the overhead measured in the row's own
    steps (the machine's CPU beyond the actors' compute, per message).  A priori
    (per_hop None): a hop's CPU from the measured curve at the payload's size.  On a machine with as many cores
    as processes that CPU would overlap; here (2 cores, 2+ actors, a driver, a raylet)
    it takes the actors' cores, so it is charged to the call.  The rest of a hop's time
    is latency on the edge (`interp` over the measured curve).  boundary_bytes[i]: the
    payload across the cut after stage i (activation up, error down: the same shape).
    async: the steady state, (makespan of 6 streamed batches - of 2) / 4, with `ahead`
    batches issued before the loss the coordinator waits for."""
    curve = tr["curve"]
    hop_cpu = lambda n: max(interp(curve, n, 2) - interp(curve, 0, 2), 0.0)  # noqa: E731
    lat = lambda n: max(interp(curve, n, 1) - interp(curve, 0, 2) - hop_cpu(n), 0.0)  # noqa: E731
    if per_hop is None:
        per_hop, cpu = interp(curve, 0, 2), hop_cpu
    else:  # measured: the payloads' CPU is in it already
        cpu = lambda n: 0.0  # noqa: E731
    fc = [v + (cpu(boundary_bytes[i]) if i < S - 1 else 0.0) for i, v in enumerate(f)]
    bc = [v + (cpu(boundary_bytes[i - 1]) if i > 0 else 0.0) for i, v in enumerate(b)]

    def comm(src, dst, op):
        return lat(boundary_bytes[src] if op == "F" else boundary_bytes[dst])

    sims = [simulate(make_schedule(schedule, S, M * k), fc, bc, comm, step_cost=u,
                     hop_cost=per_hop, cores=cores, feed=M, ahead=ahead)
            for k in ((2, 6) if schedule == "async" else (1,))]
    per_batch = (sims[-1].makespan - sims[0].makespan) / 4 if len(sims) > 1 else sims[0].makespan
    return batch / per_batch, sims[-1].bubble_fraction


# ------------------------------------------------------------------------------ runs
def time_steps(step, batches, warmup: int, steps: int, profile=None) -> list[float]:
    """Seconds between consecutive step returns in the steady state, for schedules that
    flush (async: `drained_s`).  The throughput reported for a Ray block is batch /
    their mean; the in-process blocks' steps are regular, and their median is robust
    to other jobs' bursts on a shared machine.  `step(x, y, upcoming)`: upcoming is the
    next call's batch, as the training loop passes it.

    A block: `warmup` untimed steps, the last with nothing behind it, so the pipeline is
    empty; then steps + 2.  Every timed step starts and ends with the next batch in
    flight: the first of the steps + 2 fills the pipeline, and the last runs with
    nothing behind it (it would read fast), so neither is timed.  `profile` (reset
    with the pipeline empty, read once it is empty again) covers all steps + 2 batches:
    `profile.batches`."""
    n = warmup + steps + 2
    feed = [batches[i % len(batches)] for i in range(n)]

    def call(i):
        last = i + 1 in (warmup, n)
        step(*feed[i], None if last else feed[i + 1])

    for i in range(warmup):
        call(i)
    if profile:
        profile()  # drop the warm-up's timings (allocations, lazy init)
    c0, ends = machine_busy_s(), []
    for i in range(warmup, n):
        call(i)
        ends.append(time.perf_counter())
    if profile:  # what each actor's calls took, and the machine, in these steps + 2
        profile.machine_cpu_s = machine_busy_s() - c0
        profile.batches = steps + 2
        profile.result = profile()
    return [b - a for a, b in zip(ends[:steps], ends[1:steps + 1])]


def drained_s(step, flush, batches, n: int, profile=None) -> float:
    """Seconds for n batches from an empty pipeline until it is empty again (`flush`).

    async's steady state is the difference of two such blocks: (T(2 + steps) - T(2)) /
    steps, as the simulator takes it from two makespans.  Its steps cannot be timed one
    by one: a step returns when the last actor has its loss, and with a batch issued
    ahead that loss may be there already, so steps return at irregular times (a few ms,
    then half a second).  A window of a few such steps counts a half-finished batch at
    one end or the other, by up to a fifth of its length; both ends drained count none.
    `profile` as in `time_steps`, over these n batches."""
    feed = [batches[i % len(batches)] for i in range(n)]
    if profile:
        profile()
    c0, t0 = machine_busy_s(), time.perf_counter()
    for i in range(n):
        step(*feed[i], None if i == n - 1 else feed[i + 1])
    flush()
    took = time.perf_counter() - t0
    if profile:
        profile.machine_cpu_s = machine_busy_s() - c0
        profile.batches = n
        profile.result = profile()
    return took


def step_of(ex):
    """A `time_steps` step on a Ray executor.  async gets the next batch with each call,
    as the training loop sends it, and issues it ahead.  A flushing schedule gets none:
    with it, the next batch would ride in the same calls (`runtime.batches_per_call`),
    its step would return at once and the steps would alternate long and short, so a
    window of single steps would count one batch too many or too few.  One call per
    batch is what these rows time and what the simulator's flushing batch models."""
    def step(x, y, upcoming):
        nxt = None if upcoming is None or not ex.streamed else (*upcoming, 0.01, 1e-4)
        return ex.train_step(x, y, 0.01, 1e-4, upcoming=nxt)
    return step


def unit_output_bytes() -> list[int]:
    """Bytes per sample of each unit's output (what crosses a boundary after it)."""
    _, model = build_rule_and_model(cfg_for(), SHAPE, NC)
    model.eval()
    h, out = torch.zeros(1, *SHAPE), []
    with torch.no_grad():
        for unit in model.units:
            h = unit(h)
            out.append(h.numel() * h.element_size())
    return out


class InProcess:
    """In-process executors at T torch threads and M micro-batches, built once and kept
    warm, so that short timed blocks of them can alternate with the Ray blocks."""

    def __init__(self, batch: int, batches):
        self.batch, self.batches, self._ex = batch, batches, {}

    def times(self, threads: int, M: int, steps: int, warmup: int = 1) -> list[float]:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if (threads, M) not in self._ex:
                cfg = cfg_for(M=M, batch=self.batch)
                _, model = build_rule_and_model(cfg, SHAPE, NC)
                self._ex[(threads, M)] = InProcessExecutor(model, optim_config(cfg),
                                                           micro_batches=M)
            ex = self._ex[(threads, M)]
            return time_steps(lambda x, y, _: ex.train_step(x, y, 0.01, 1e-4), self.batches,
                              warmup, steps)
        finally:
            torch.set_num_threads(old)

    def rate(self, threads: int, M: int, steps: int, warmup: int = 1) -> float:
        return self.batch / statistics.median(self.times(threads, M, steps, warmup))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 32, 3 steps, S in 1,2, M in 1,4")
    p.add_argument("--batch", type=int, default=128, help="the PFA recipe's batch size")
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (in-process block, Ray "
                                                         "block) per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the "
                                                         "simulator's profile: all but the first)")
    p.add_argument("--stages", default="1,2,4")
    p.add_argument("--micro", default="1,4,8")
    p.add_argument("--repeats", type=int, default=3, help="cost measurement repeats")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--allocator", choices=["jemalloc", "glibc"], default=None,
                   help="runtime.allocator of the actors (default: the config's)")
    args = p.parse_args(argv)
    if args.allocator:
        RUNTIME["allocator"] = args.allocator
    if args.quick:
        args.batch, args.steps, args.warmup, args.repeats, args.rounds = 32, 3, 2, 2, 1
        args.stages, args.micro = "1,2", "1,4"
    stages = [int(s) for s in args.stages.split(",")]
    micro = [int(m) for m in args.micro.split(",")]
    if any(args.batch % m for m in micro):
        p.error("--batch must be divisible by every --micro")
    command = "python benchmarks/pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = LoadSampler()
    t_start = time.perf_counter()
    keep_freed_memory()  # as `localnet run` and every actor (localnet/alloc.py)
    torch.set_num_threads(1)
    batches = data(args.batch)
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    import ray

    ray.init(num_cpus=max(4, max(stages)), include_dashboard=False, log_to_driver=False)
    from localnet.runtime.ray_executor import RayExecutor
    from localnet.runtime.worker import StageWorker

    env = hardware()
    log(f"# {env}; commit {commit()}; load average at start {os.getloadavg()[0]:.2f}")

    # -- per-message overhead -------------------------------------------------------
    fr = framing(200 if not args.quick else 50)
    per_sample = unit_output_bytes()
    cut = per_sample[:-1]  # the head's output never crosses a boundary
    lo = min(cut) * args.batch // max(micro)
    hi = max(cut) * args.batch // min(micro)
    sizes = [lo << k for k in range(64) if lo << k < 2 * hi]
    tr = ray_transfer(40 if not args.quick else 10, sizes)
    for f in fr:
        log(f"framing  {f['payload_bytes']:>8} B payload  {f['header_bytes']} B header  "
            f"{f['framing_us']:.1f} us")
    log(f"ray      no-op call {tr['call_us']:.0f} us; service {tr['service_us']:.0f} us per call; "
        f"hop actor->actor {tr['hop_us']:.0f} us tiny, {tr['hop_1mb_us']:.0f} us with 1 MiB")
    framing_1mb = fr[-1]["framing_us"] * 1e-6 / tr["transfer_1mb_s"]

    # -- in-process baselines ---------------------------------------------------------
    # base[T]: whole batch at T threads (the baseline); base_m[T, M]: the same
    # micro-batches as the pipeline, one after another -- the pipeline's work without it
    # (these figures are context; each Ray row is compared with in-process blocks timed
    # in turn with its own blocks, below)
    ip = InProcess(args.batch, batches)
    base, base_m = {}, {}
    for T in sorted(set(stages) | {1}):  # 1: the perfect-scaling reference
        for M in sorted(set(micro) | {1}):
            base_m[(T, M)] = ip.rate(T, M, args.steps, args.warmup)
            log(f"inprocess threads={T} M={M}  {base_m[(T, M)]:.1f} samples/s")
        base[T] = base_m[(T, 1)]

    # -- costs for the partition and the simulator -----------------------------------
    unit_costs = {}
    for M in micro:
        for stash in ([False, True] if max(stages) > 1 else [False]):
            unit_costs[(M, stash)] = measure_costs(cfg_for(M=M, batch=args.batch), SHAPE, NC,
                                                   None, args.batch // M, args.repeats, 1, stash)
    # balance each run by its own micro-batch's unit costs, as `balance: cost` does (the
    # 16-channel blocks at 32x32 cost twice the 64-channel ones at batch 128, less at 32)
    def bounds_for(S, M, stash):
        f, b, _ = unit_costs[(M, stash)]
        return balanced_boundaries([x + y for x, y in zip(f, b)], S)

    # -- Ray ----------------------------------------------------------------------------
    Remote = ray.remote(num_cpus=0)(StageWorker)
    # the actors the executor would spawn: one torch thread, the runtime's CPU policy
    policy = cfg_for().runtime.cpu_policy
    pool = [Remote.remote(threads=1, cpu_policy=policy) for _ in range(max(stages))]
    rows = []
    cores = os.cpu_count() or 1
    for S in stages:
        for M in micro:
            for schedule in ["gpipe"] + (["async"] if S > 1 else []):
                cut = bounds_for(S, M, schedule == "async")  # [] for S = 1
                cfg = cfg_for(schedule, M, args.batch, cut)
                ex = RayExecutor(cfg, SHAPE, NC, actors=pool)
                prof = lambda: ex.stage_timings(True)  # noqa: E731
                # rounds of: in-process at S threads (whole batch, and the same M), then
                # Ray; the ratios pair each Ray block with the in-process blocks next to it
                dts, ip1, ipm, tm, machine, rates = [], [], [], None, 0.0, []
                pair, pair_m = [], []
                for r in range(args.rounds):
                    a = ip.times(S, 1, args.steps)
                    am = ip.times(S, M, args.steps) if M > 1 else a
                    warmup = args.warmup if r == 0 else 1
                    if schedule == "async":  # the steady state between drained ends
                        drained_s(step_of(ex), ex.flush, batches, warmup)
                        short = drained_s(step_of(ex), ex.flush, batches, 2)
                        long = drained_s(step_of(ex), ex.flush, batches, 2 + args.steps,
                                         profile=prof)
                        d = [(long - short) / args.steps] * args.steps
                    else:
                        d = time_steps(step_of(ex), batches, warmup, args.steps, profile=prof)
                    dts, ip1, ipm = dts + d, ip1 + a, ipm + am
                    machine += prof.machine_cpu_s
                    tm = prof.result if tm is None else [  # per stage, every round's calls
                        {k: v + more[k] if isinstance(v, list) else v for k, v in seen.items()}
                        for seen, more in zip(tm, prof.result)]
                    # Ray's block by its mean step (async: its steady-state step)
                    pair.append(statistics.median(a) / statistics.mean(d))
                    pair_m.append(statistics.median(am) / statistics.mean(d))
                    rates.append(args.batch / statistics.mean(d))
                measured = statistics.median(rates)
                base_row = args.batch / statistics.median(ip1)
                base_row_m = args.batch / statistics.median(ipm)
                ratio, ratio_m = statistics.median(pair), statistics.median(pair_m)

                pb = [per_sample[c - 1] * (args.batch // M) for c in cut]
                ahead = batches_ahead(cfg.runtime.schedule)
                pred = lambda f, b, u, pc=None: predict(schedule, S, M, f, b, u, pb, tr,  # noqa: E731
                                                        cores, args.batch, pc, ahead)

                med = lambda t, op: statistics.median(t[op]) if t[op] else 0.0  # noqa: E731
                ops = ("forward", "backward", "update")
                costs = [[med(t, op) for t in tm] for op in ops]
                cpu_costs = [[med(t, op + "_cpu") for t in tm] for op in ops]
                # the machine's CPU in the block's steps beyond the actors' compute: the
                # data plane and the coordinator, per message between stages (an
                # activation up and an error down per cut and micro-batch)
                hops = 2 * (S - 1) * M * args.rounds * prof.batches
                in_calls = sum(sum(t[op + "_cpu"]) for t in tm for op in ops)
                per_call = max(machine - in_calls, 0.0) / max(hops, 1)
                # fewer cores than actors: a call's wall time counts the time slices the
                # others took, which the simulator's core limit already models -- feed it
                # the CPU time instead
                predicted, bubble = pred(*(costs if S <= cores else cpu_costs), per_call)
                fu, bu, su = unit_costs[(M, schedule == "async")]
                cuts = [0] + cut + [len(fu)]
                per = lambda c: [sum(c[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]  # noqa: E731
                apriori, _ = pred(per(fu), per(bu), per(su))
                row = {"stages": S, "micro_batches": M, "schedule": schedule, "boundaries": cut,
                       "samples_per_s": round(measured, 1),
                       "samples_per_s_mean": round(args.batch * len(dts) / sum(dts), 1),
                       "inprocess_same_threads": round(base_row, 1),
                       "vs_inprocess": round(ratio, 3),
                       "vs_inprocess_rounds": [round(x, 3) for x in pair],
                       "inprocess_same_micro": round(base_row_m, 1),
                       "vs_inprocess_same_micro": round(ratio_m, 3),
                       "predicted": round(predicted, 1),
                       "sim_error": round(abs(predicted - measured) / measured, 3),
                       "predicted_apriori": round(apriori, 1),
                       "sim_error_apriori": round(abs(apriori - measured) / measured, 3),
                       "bubble_predicted": round(bubble, 3),
                       "profiled": {"forward": costs[0], "backward": costs[1],
                                    "update": costs[2], "boundary_bytes": pb,
                                    "per_hop_overhead_s": per_call, "hops": hops,
                                    "machine_cpu_s": machine,
                                    "cpu": cpu_costs}}
                if schedule == "gpipe":
                    bound = M / (M + S - 1)
                    row["gpipe_bound"] = round(bound, 3)
                    # the target: gpipe / in-process at the same threads, over
                    # the bubble's ceiling M/(M+S-1); and against S perfect 1-thread cores
                    row["vs_bound"] = round(ratio / bound, 3)
                    row["vs_bound_same_micro"] = round(ratio_m / bound, 3)
                    row["vs_linear_bound"] = round(measured / (S * base[1] * bound), 3)
                rows.append(row)
                log(f"ray S={S} M={M} {schedule:5s} {measured:7.1f} samples/s  "
                    f"(in-process {base_row:.1f}: x{row['vs_inprocess']:.2f}; same M "
                    f"x{row['vs_inprocess_same_micro']:.2f})  "
                    f"simulated {predicted:7.1f} (error {row['sim_error']:.1%}; a priori "
                    f"{apriori:.1f}, {row['sim_error_apriori']:.1%})")
                ex.detach_actors()
    for w in pool:
        ray.kill(w)
    ray.shutdown()

    async2 = [r for r in rows if r["stages"] == 2 and r["schedule"] == "async"]
    best2 = max(async2, key=lambda r: r["vs_inprocess"]) if async2 else None
    gp = [r for r in rows if r["schedule"] == "gpipe" and 1 < r["stages"] <= cores]
    result = {
        "sim_error_max": max(r["sim_error"] for r in rows),
        "sim_error_max_apriori": max(r["sim_error_apriori"] for r in rows),
        "framing_overhead_1mb": round(framing_1mb, 4),
        "two_stage_vs_inprocess": best2["vs_inprocess"] if best2 else None,
        "two_stage_async_micro_batches": best2["micro_batches"] if best2 else None,
        "gpipe_vs_bound": min((r["vs_bound"] for r in gp), default=None),
        "gpipe_vs_bound_same_micro": min((r["vs_bound_same_micro"] for r in gp), default=None),
        "gpipe_vs_linear_bound": min((r["vs_linear_bound"] for r in gp), default=None),
        "targets": TARGETS,
        "framing": [{k: round(v, 1) if isinstance(v, float) else v for k, v in f.items()}
                    for f in fr],
        "ray_transfer_us": {k: round(v, 1) for k, v in tr.items() if k.endswith("_us")},
        "hop_curve": tr["curve"],
        "inprocess": {str(k): round(v, 1) for k, v in base.items()},
        "inprocess_micro": {f"{t}x{m}": round(v, 1) for (t, m), v in base_m.items()},
        "rows": rows, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "cores": cores,
        "load_average": load.stop(), "wall_s": round(time.perf_counter() - t_start, 1),
        "hardware": env, "commit": commit(), "command": command,
    }
    if not args.no_write:
        write_results(result)
    return result


# ------------------------------------------------------------------------------ RESULTS.md
def write_results(r: dict) -> None:
    lines = [
        "### Pipeline: ResNet-20 + PFA on CPU, Ray stages vs in-process",
        "",
        f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: "
        f"`{r['command'].strip()}` (actors that run their own schedule, one coordinator "
        f"call per actor per batch, activations and errors over gloo; actors at nice 0, "
        f"`RAY_worker_niceness=0`, like the in-process baseline).  Batch {r['batch']}, one torch thread per actor; the "
        f"in-process baseline gets as many threads as there are actors.  Each row is "
        f"{r['rounds']} rounds of (in-process block, Ray block), {r['steps']} timed steps "
        f"per block: samples/s = the median over rounds of batch / a Ray block's mean "
        f"step -- for async, whose steps return at irregular times (each next batch is "
        f"issued ahead), the steady-state step (T(2 + steps) - T(2)) / steps between "
        f"drained pipelines --, and a ratio is the median over rounds of Ray / the in-process block of "
        f"the same round, by its median step (this "
        f"machine's speed drifts by 10-30% within minutes).  1-minute load average (the "
        f"benchmark's own processes count) was {r['load_average']['start']} at the start, "
        f"mean {r['load_average']['mean']}, max {r['load_average']['max']} (on {r['cores']} "
        f"cores).  Wall time {r['wall_s']} s.",
        "",
        "Simulated: `schedule.simulate` with the per-stage costs the actors profiled during "
        "the timed steps (wall time per action; CPU time where there are more actors than "
        "cores, since the simulator's core limit models the sharing), plus the runtime's "
        "overhead per message measured in the same steps (the machine's CPU beyond the "
        "actors' compute, per message between stages: data plane and coordinator), the "
        "measured hop curve and the core count.  A priori: every unit timed alone "
        "in-process and the hop curve's CPU per message.  Whole batch: the in-process executor on the whole batch at S threads; same "
        "M: on the same M micro-batches one after another (the pipeline's work without the "
        "pipeline).  vs bound: ratio / M/(M+S-1), the bubble's ceiling.",
        "",
        "| stages | M | schedule | cut | samples/s | in-process (whole batch) | ratio | ratio "
        "per round | in-process (same M) | ratio | simulated | sim error | a priori | "
        "a-priori error | ms overhead per message | vs bound (whole batch) | vs bound (same M) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
        "--- | --- | --- |",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['stages']} | {row['micro_batches']} | {row['schedule']} | "
                     f"{row['boundaries'] or '—'} | {row['samples_per_s']} | "
                     f"{row['inprocess_same_threads']} | {row['vs_inprocess']} | "
                     f"{', '.join(map(str, row['vs_inprocess_rounds']))} | "
                     f"{row['inprocess_same_micro']} | {row['vs_inprocess_same_micro']} | "
                     f"{row['predicted']} | {row['sim_error']:.1%} | "
                     f"{row['predicted_apriori']} | {row['sim_error_apriori']:.1%} | "
                     f"{row['profiled']['per_hop_overhead_s'] * 1e3:.2f} | "
                     f"{row.get('vs_bound', '—')} | {row.get('vs_bound_same_micro', '—')} |")
    lines += ["", "Per-message overhead (wire format: msgpack header + numpy payload, "
                  "encode + decode + validation):", "",
              "| payload bytes | header bytes | framing (us) |", "| --- | --- | --- |"]
    for f in r["framing"]:
        lines.append(f"| {f['payload_bytes']} | {f['header_bytes']} | {f['framing_us']} |")
    t = r["ray_transfer_us"]
    lines += ["", f"Ray on this machine: a no-op actor call {t['call_us']} us round trip, "
                  f"{t['service_us']} us of an actor's time per call; a hop (a call on another "
                  f"actor taking the previous result) {t['hop_us']} us with a tiny payload, "
                  f"{t['hop_1mb_us']} us with 1 MiB -- the 1 MiB transfer time that framing is "
                  f"compared with.  Hop time / CPU (all processes) by payload: "
                  + ", ".join(f"{n // 1024} KiB {h * 1e3:.2f} / {c * 1e3:.2f} ms"
                              for n, h, c in r["hop_curve"]) + ".", "",
              "| metric | measured | target |", "| --- | --- | --- |",
              f"| simulator error, max over rows (profiled costs) | {r['sim_error_max']:.1%} | "
              f"< 15% |",
              f"| simulator error, max over rows (a-priori costs) | "
              f"{r['sim_error_max_apriori']:.1%} | (< 15%) |",
              f"| framing / 1 MiB transfer | {r['framing_overhead_1mb']:.2%} | < 5% |",
              f"| 2-stage async / in-process at 2 threads (M={r['two_stage_async_micro_batches']}) "
              f"| {r['two_stage_vs_inprocess']} | >= 0.9 |",
              f"| gpipe / (in-process at S threads x M/(M+S-1)), min over M, 1 < S <= cores | "
              f"{r['gpipe_vs_bound']} | >= 0.9 |",
              f"| the same against in-process on the same M micro-batches | "
              f"{r['gpipe_vs_bound_same_micro']} | — |",
              f"| the same against S x 1-thread in-process (perfect scaling) | "
              f"{r['gpipe_vs_linear_bound']} | — |",
              ]
    write_section("pipeline", lines)


if __name__ == "__main__":
    res = main()
    print(json.dumps(res))
