"""Where the actors go: one placement group of a bundle per actor, refused at once when
the cluster's nodes can never hold it, and the actors started a few at a time into it.

Ray does the placing; this file only asks for it (`Placer`), checks beforehand that the
request can be met (`unplaceable`: else Ray would wait for `runtime.timeout_s` and fail
without saying why), and paces the starts (`start_window`).
"""

from __future__ import annotations

import os
import time

from ..errors import ConfigError
from ..files import counted
from .cpu_policy import openmp_env
from .session import SETUP_HINT, NoReply, actor_env, cluster_address, get


def places(bundle: dict, n: int, nodes: list[dict]) -> int:
    """How many of n identical `bundle`s the nodes' total resources hold (each bundle on
    one node).  Fewer than n: the placement group would never be ready."""
    fits = 0
    for have in nodes:
        fits += min(int(have.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
    return min(fits, n)


def unplaceable(bundle: dict, n: int, nodes: list[dict]) -> str | None:
    """Why n actors asking for `bundle` can never all be placed on these nodes (their
    total resources, whatever runs now), naming the settings; None if they can."""
    fits = places(bundle, n, nodes)
    if fits >= n:
        return None
    total = {k: sum(h.get(k, 0.0) for h in nodes) for k in bundle}
    return (f"{counted(n, 'actor')} each asking for {bundle} (runtime.num_cpus, "
            f"runtime.num_gpus) do not fit the Ray cluster's {counted(len(nodes), 'node')}, "
            f"{total} in all: at most {fits} would be placed.  Ask for less per actor, use "
            f"fewer actors (runtime.partition), or add nodes; an embedded Ray offers "
            f"runtime.local_cpus CPUs and the GPUs it finds")


def start_window(runtime) -> int:
    """How many actors start at once (`runtime.start_window`): by default the cores
    they start on, plus one to cover the moments a starting process is not computing
    (its spawn, its registration with Ray)."""
    if runtime.start_window is not None:
        return runtime.start_window
    if cluster_address(runtime):
        import ray

        # Ray nodes started on one machine share its cores: count each host once
        hosts: dict[str, float] = {}
        for n in ray.nodes():
            if n.get("Alive"):
                host = n.get("NodeManagerAddress", "")
                hosts[host] = max(hosts.get(host, 0.0), n["Resources"].get("CPU", 0.0))
        cores = sum(hosts.values())
    else:  # the embedded Ray's num_cpus is a setting; its actors share this machine's cores
        cores = len(os.sched_getaffinity(0))
    return max(int(cores), 1) + 1


class Placer:
    """Spawns StageWorker actors, each in its own bundle of one placement group."""

    def __init__(self, runtime, timeout: float):
        self.rt, self.timeout, self.pg = runtime, timeout, None
        self._remote: dict = {}  # cls -> its Ray actor class

    def reserve(self, S: int) -> None:
        """One placement group of S bundles (one per actor), ready."""
        import ray
        from ray.util.placement_group import placement_group

        rt = self.rt
        # a bundle may not be all zeros: reserve a token CPU share when num_cpus is 0
        bundle = {"CPU": rt.num_cpus or 0.001, **({"GPU": rt.num_gpus} if rt.num_gpus else {})}
        why = unplaceable(bundle, S, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if why:  # else the group would wait for runtime.timeout_s, then fail
            raise ConfigError(why)
        self.pg = placement_group([dict(bundle) for _ in range(S)], strategy=rt.placement)
        try:
            ray.get(self.pg.ready(), timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise NoReply(f"placement group of {S} bundles {bundle} ({rt.placement}) not "
                          f"ready within {self.timeout}s: does the cluster have the "
                          f"resources (runtime.num_cpus / num_gpus)?") from None

    def start(self, cls, specs: list, window: int, tell, out: list) -> tuple[list, float]:
        """Actor i in bundle i, and its setup(specs[i]) called, with at most `window`
        actors starting at once (0: all).  Starting is `import torch` and building a
        part, seconds of CPU each: started together on few cores, they take turns and
        each one costs more (caches, switches), so the last is ready later than if
        they had started a few at a time.  Each handle is appended to `out` as it
        starts, so that a caller interrupted here can still kill it.  tell(n) as n
        setups finish; the first setup that fails raises its error (`get`), and no
        more actors start.  Returns the setup refs, in order, and the seconds waited."""
        import ray

        S, window = len(specs), window or len(specs)
        refs, pending, t0 = [], set(), time.monotonic()
        tell(0)
        while len(refs) < S or pending:
            while len(refs) < S and len(pending) < window:
                worker = self.spawn_one(cls, len(refs))
                out.append(worker)
                refs.append(worker.setup.remote(specs[len(refs)]))
                pending.add(refs[-1])
            if time.monotonic() - t0 > self.timeout:
                if len(refs) < S:  # else get() says it, with any actor's own error
                    raise NoReply(f"ray executor: {len(refs) - len(pending)} of {S} actors "
                                  f"ready after {self.timeout:g} s (runtime.timeout_s)"
                                  f"{SETUP_HINT}")
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if done:
                get(done, self.timeout, "setup")  # an actor that failed: stop starting more
                pending.difference_update(done)
                tell(len(refs) - len(pending))
        return refs, time.monotonic() - t0

    def spawn_one(self, cls, i: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        rt = self.rt
        if cls not in self._remote:
            # once per class, not per actor: Ray exports each new actor class on its
            # first use, hashing its disassembled code on the driver's CPU while the
            # actors start
            # a cluster's nodes were started by someone else: ask for the allocator per
            # actor (an embedded Ray gives it to every worker: ensure_ray)
            env = {**(actor_env(rt) if cluster_address(rt) else {}),
                   **openmp_env(rt.threads, rt.num_cpus)}
            self._remote[cls] = ray.remote(num_cpus=rt.num_cpus, num_gpus=rt.num_gpus,
                                           max_concurrency=1,
                                           **({"runtime_env": {"env_vars": env}} if env else {})
                                           )(cls)
        remote = self._remote[cls]
        if self.pg is not None:
            remote = remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=i))
        return remote.remote(threads=rt.threads, cpu_policy=rt.cpu_policy)

    def close(self) -> None:
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
            self.pg = None


