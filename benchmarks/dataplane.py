"""Which engine should carry activations and errors from actor to actor?

    python benchmarks/dataplane.py                 # all three planes, 4 KiB - 4 MiB
    python benchmarks/dataplane.py --hops 400 --no-write   # quicker, print only

Three existing engines, each between two Ray actors on this machine, one payload at a
time bouncing A -> B -> A (a hop is one direction):

gloo        torch.distributed point-to-point (send / recv) in a process group the
            driver sets up among the actors over Ray (actor 0 hosts the TCPStore), the
            way Ray Train does for data parallel training.
ray-call    actor A calls B.echo(payload) and B's reply brings it back (Ray's own
            actor-to-actor path: inline up to 100 KiB, the object store above).
cgraph      Ray Compiled Graphs: a static DAG A.echo -> B.echo compiled once, shared-
            memory channels on a node; one execute() is a hop in, two between actors
            and one out, so a hop is a quarter of it.
ray-channel Compiled Graphs' shared-memory channel on its own, point to point (each
            actor writes one, `ray.experimental.channel`), read only once a 1 KiB gloo
            frame announced the payload -- so a waiting receiver blocks in gloo instead
            of spinning in the channel -- and copied out, which releases the channel for
            the next write.  The payload goes in parts of at most 1 MiB: Ray copies a
            larger buffer with 6 new threads each time.  This is what a plane with
            gloo frames and Ray's shared memory for the bytes would cost.
localnet    localnet's own plane on gloo (`localnet/runtime/plane.py`): a message with
            its msgpack header in a frame, a small payload copied behind it as one
            transfer, a large one (plane.ZERO_COPY and up) sent uncopied as a second,
            and the receiver's buffers posted ahead -- what the actors use.  Then again
            with every payload copied behind its frame: what the uncopied path saves.

Per size: the median latency per hop and the machine's CPU per hop (busy jiffies of
every core in /proc/stat, so Ray's raylet and helper threads count too), and per plane
the machine's CPU while a receiver waits for a message that does not come for 2 s (a
spinning or polling receiver costs a core on a small machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

from common import commit, hardware_cpu, write_section  # noqa: E402

from localnet.timing import machine_busy_s  # noqa: E402

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20]



class Peer:
    """One end of the gloo and ray-call planes (made a Ray actor below)."""

    def __init__(self):
        import torch  # noqa: F401 - the actor pays the import once, before timing
        self.pg = None

    def free_port(self) -> tuple[str, int]:
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        s.close()
        return socket.gethostbyname(socket.gethostname()), port

    def gloo_init(self, addr, port, rank, world):
        import torch.distributed as dist

        store = dist.TCPStore(addr, port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
        self.pg = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=60))
        self.rank = rank
        return True

    def gloo_bounce(self, nbytes: int, hops: int, first: bool) -> list[float]:
        """Ping-pong `hops` hops; returns the wall time of each round trip (on A)."""
        import torch

        buf = torch.zeros(nbytes // 4)
        peer, times = 1 - self.rank, []
        for _ in range(hops // 2):
            t = time.perf_counter()
            if first:
                self.pg.send([buf], peer, 0).wait()
                self.pg.recv([buf], peer, 0).wait()
            else:
                self.pg.recv([buf], peer, 0).wait()
                self.pg.send([buf], peer, 0).wait()
            times.append(time.perf_counter() - t)
        return times

    def gloo_wait(self, seconds: float) -> float:
        """Block in a recv that the peer answers after `seconds` (receiver idle CPU)."""
        import torch

        buf = torch.zeros(1)
        t = time.perf_counter()
        self.pg.recv([buf], 1 - self.rank, 1).wait()
        return time.perf_counter() - t

    def gloo_send_late(self, seconds: float) -> bool:
        import torch

        time.sleep(seconds)
        self.pg.send([torch.zeros(1)], 1 - self.rank, 1).wait()
        return True

    def plane_init(self, addr, port, rank, world, copy_all: bool = False):
        from localnet.alloc import keep_freed_memory
        from localnet.runtime import plane

        keep_freed_memory()  # as every stage actor does: buffers are reused, not re-faulted
        if copy_all:  # every payload copied behind its frame, large ones too
            plane.ZERO_COPY = 1 << 62
        self.plane = plane.GlooPlane(addr, port, rank, world, 60, ["a", "b"])
        self.rank = rank
        return True

    def plane_bounce(self, nbytes: int, hops: int, first: bool) -> list[float]:
        """As gloo_bounce, through localnet's plane: header and frame included."""
        import torch

        from localnet.runtime.messages import Message

        m = Message.make("activation", torch.zeros(nbytes // 4), src="ab"[self.rank],
                         dst="ab"[1 - self.rank], step=0, mb=0)
        peer, times = 1 - self.rank, []
        for _ in range(hops // 2):
            t = time.perf_counter()
            if first:
                self.plane.send(peer, *m.wire())
                self.plane.recv(peer)
            else:
                self.plane.recv(peer)
                self.plane.send(peer, *m.wire())
            self.plane.settle(0)
            times.append(time.perf_counter() - t)
        return times

    def plane_wait(self, seconds: float) -> float:
        """Block in the plane's recv until the peer sends, `seconds` late."""
        t = time.perf_counter()
        self.plane.recv(1 - self.rank)
        return time.perf_counter() - t

    def plane_send_late(self, seconds: float) -> bool:
        from localnet.runtime.messages import Message

        time.sleep(seconds)
        m = Message.make("activation", np.zeros(16, np.float32), src="ab"[self.rank],
                         dst="ab"[1 - self.rank], step=0, mb=0)
        self.plane.send(1 - self.rank, *m.wire())
        self.plane.settle(0)
        return True

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def channel_open(self, reader, reader_node: str, nbytes: int):
        """This actor's channel to `reader` (a channel is made by its writer)."""
        import ray
        from ray.experimental.channel.shared_memory_channel import Channel

        self.out = Channel(ray.get_runtime_context().current_actor, [(reader, reader_node)],
                           nbytes + (64 << 10))  # room for Ray's own framing of the parts
        self.out.ensure_registered_as_writer()
        return self.out

    def channel_take(self, ch) -> bool:
        self.inn = ch
        ch.ensure_registered_as_reader()
        return True

    def channel_bounce(self, nbytes: int, hops: int, first: bool) -> list[float]:
        """As gloo_bounce: the payload through the channel, its frame over gloo."""
        import torch

        x, into = np.zeros(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        step = CHANNEL_PART
        parts = [x[i:i + step] for i in range(0, nbytes, step)]
        head, head_in = torch.zeros(1024, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)
        peer, times = 1 - self.rank, []

        def send():
            self.out.write(parts, timeout=60)
            self.pg.send([head], peer, 2).wait()

        def recv():
            self.pg.recv([head_in], peer, 2).wait()
            got = self.inn.read(timeout=60)  # views of the shared buffer
            off = 0
            for p in got:
                into[off:off + p.size] = p
                off += p.size
            del got, p  # the last view gone, the writer may write again

        for _ in range(hops // 2):
            t = time.perf_counter()
            (send, recv)[not first]()
            (recv, send)[not first]()
            times.append(time.perf_counter() - t)
        return times

    def echo(self, x):
        return x

    def call_bounce(self, other, nbytes: int, hops: int) -> list[float]:
        import ray

        x = np.zeros(nbytes, np.uint8)
        times = []
        for _ in range(hops // 2):
            t = time.perf_counter()
            x = ray.get(other.echo.remote(x), timeout=60)
            times.append(time.perf_counter() - t)
        return times


COPIED = "localnet, every payload copied"
CHANNEL_PART = 1 << 20  # bytes: Ray copies a larger buffer into a channel with 6 threads


def measure(run, hops: int, per_call_hops: int) -> tuple[float, float]:
    """(median latency per hop, machine CPU per hop) of run() -> list of round times."""
    c0 = machine_busy_s()
    times = run()
    c1 = machine_busy_s()
    n = len(times) * per_call_hops
    return statistics.median(times) / per_call_hops, (c1 - c0) / n


def idle_cpu(fn, seconds: float = 2.0) -> float:
    """Machine CPU (cores busy) during `seconds` of a receiver waiting."""
    c0, t0 = machine_busy_s(), time.perf_counter()
    fn(seconds)
    return (machine_busy_s() - c0) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=2000, help="hops per size (half as many round trips)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    R = ray.remote(num_cpus=0)(Peer)
    a, b = R.remote(), R.remote()
    rows: dict[str, dict] = {"gloo": {}, "localnet": {}, COPIED: {}, "ray-call": {},
                             "cgraph": {}, "ray-channel": {}}
    idle: dict[str, float] = {}
    get = lambda r: ray.get(r, timeout=300)  # noqa: E731

    # gloo
    addr, port = get(a.free_port.remote())
    get([a.gloo_init.remote(addr, port, 0, 2), b.gloo_init.remote(addr, port, 1, 2)])
    for n in SIZES:
        get([a.gloo_bounce.remote(n, 20, True), b.gloo_bounce.remote(n, 20, False)])  # warm
        def run(n=n):
            ra, rb = a.gloo_bounce.remote(n, args.hops, True), b.gloo_bounce.remote(n, args.hops, False)
            return get([ra, rb])[0]
        rows["gloo"][n] = measure(run, args.hops, 2)
    def gloo_idle(s):
        r = b.gloo_send_late.remote(s)
        get([a.gloo_wait.remote(s), r])
    idle["gloo"] = idle_cpu(gloo_idle)

    # Ray's shared-memory channels point to point, frames over the gloo group above
    na, nb = get([a.node.remote(), b.node.remote()])
    ab = get(a.channel_open.remote(b, nb, SIZES[-1]))
    ba = get(b.channel_open.remote(a, na, SIZES[-1]))
    get([b.channel_take.remote(ab), a.channel_take.remote(ba)])
    for n in SIZES:
        get([a.channel_bounce.remote(n, 20, True), b.channel_bounce.remote(n, 20, False)])
        def run(n=n):
            ra = a.channel_bounce.remote(n, args.hops, True)
            rb = b.channel_bounce.remote(n, args.hops, False)
            return get([ra, rb])[0]
        rows["ray-channel"][n] = measure(run, args.hops, 2)
    idle["ray-channel"] = idle["gloo"]  # it waits in the same gloo receive

    # localnet's plane, on a process group of its own; then with every payload copied
    # behind its frame, the way it sends small ones (what ZERO_COPY saves, or costs)
    for name, copy_all in (("localnet", False), (COPIED, True)):
        pa, pb = (R.remote(), R.remote()) if copy_all else (a, b)
        addr, port = get(pa.free_port.remote())
        get([pa.plane_init.remote(addr, port, 0, 2, copy_all),
             pb.plane_init.remote(addr, port, 1, 2, copy_all)])
        for n in SIZES:
            get([pa.plane_bounce.remote(n, 20, True), pb.plane_bounce.remote(n, 20, False)])
            def run(n=n, pa=pa, pb=pb):
                ra = pa.plane_bounce.remote(n, args.hops, True)
                rb = pb.plane_bounce.remote(n, args.hops, False)
                return get([ra, rb])[0]
            rows[name][n] = measure(run, args.hops, 2)
        if copy_all:
            ray.kill(pa), ray.kill(pb)
        else:
            def plane_idle(s, pa=pa, pb=pb):
                r = pb.plane_send_late.remote(s)
                get([pa.plane_wait.remote(s), r])
            idle[name] = idle_cpu(plane_idle)

    # Ray actor-to-actor calls
    for n in SIZES:
        get(a.call_bounce.remote(b, n, 20))
        rows["ray-call"][n] = measure(lambda n=n: get(a.call_bounce.remote(b, n, args.hops)),
                                      args.hops, 2)
    idle["ray-call"] = idle_cpu(time.sleep)  # an idle actor waits in Ray's event loop

    # Ray Compiled Graphs
    try:
        from ray.dag import InputNode

        c, d = R.remote(), R.remote()  # actors of its own: a compiled DAG owns their loop
        with InputNode() as inp:  # compiled once, with room for the largest payload
            dag = d.echo.bind(c.echo.bind(inp))
        cg = dag.experimental_compile(_buffer_size_bytes=2 * SIZES[-1])
        for n in SIZES:
            x = np.zeros(n, np.uint8)
            for _ in range(10):
                ray.get(cg.execute(x), timeout=60)

            def run(x=x):
                times = []
                for _ in range(args.hops // 4):
                    t = time.perf_counter()
                    ray.get(cg.execute(x), timeout=60)
                    times.append(time.perf_counter() - t)
                return times
            rows["cgraph"][n] = measure(run, args.hops, 4)
        idle["cgraph"] = idle_cpu(time.sleep)  # compiled, nothing to do
        # (no cg.teardown(): on Ray 2.60 it waits for ever on these actors' loops;
        # the process exits below without it)
    except Exception as err:  # noqa: BLE001 - say why, keep the other planes
        print(f"cgraph failed: {type(err).__name__}: {err}", file=sys.stderr)
    lines = [f"Hardware: {hardware_cpu()}, Ray {ray.__version__}. Commit `{commit()}`. "
             f"Command: `python benchmarks/dataplane.py --hops {args.hops}`.", "",
             "| plane | " + " | ".join(f"{n >> 10} KiB latency / CPU per hop (ms)" for n in SIZES)
             + " | machine CPU while a receiver waits (cores) |",
             "| --- | " + " | ".join("---" for _ in SIZES) + " | --- |"]
    for name, r in rows.items():
        cells = [f"{r[n][0] * 1e3:.3f} / {r[n][1] * 1e3:.3f}" if n in r else "failed" for n in SIZES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {idle.get(name, float('nan')):.3f} |")
    print("\n".join(lines))
    print(json.dumps({"rows": {k: {str(n): v for n, v in r.items()} for k, r in rows.items()},
                      "idle": idle}))
    if not args.no_write:
        write_section("dataplane", ["### Data planes: one hop between two actors on this machine",
                                    "", *lines])
    sys.stdout.flush()
    os._exit(0)  # skip Ray's teardown of the compiled DAG (see above)


if __name__ == "__main__":
    sys.exit(main())
