"""The Ray side of the coordinator: the session, and the actors' replies.

Ray runs the cluster (embedded, or joined at runtime.address), places the actors
(`placement.py`), restarts what died (the coordinator's recovery asks it to), and carries
the coordinator's one call per actor per batch.  Activations and errors do not go
through Ray (`plane.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from .messages import MessageError
from .frames import PeerFailed


def cluster_address(runtime) -> str | None:
    """The Ray cluster to join (runtime.address, else $RAY_ADDRESS); None: embedded."""
    return runtime.address or os.environ.get("RAY_ADDRESS") or None


class NoReply(TimeoutError):
    """Ray or the actors did not answer within runtime.timeout_s."""


class ClusterUnreachable(RuntimeError):
    """runtime.address / $RAY_ADDRESS names no Ray cluster that answers."""


def _connect(address: str, timeout_s: float) -> None:
    """Open and close a TCP connection to host:port (OSError when nothing accepts it)."""
    host, _, port = address.rpartition(":")
    socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()


def _answers(address: str, where: str, timeout_s: float = 10.0) -> None:
    """A host:port address must accept a connection before ray.init gets it: Ray itself
    retries an unreachable GCS for minutes, printing warnings, instead of failing."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in address:
        return  # auto, ray://..., a URL: Ray resolves (and reports) those itself
    try:
        _connect(address, timeout_s)
    except OSError as err:
        raise ClusterUnreachable(_unreachable(where, f"nothing answers there ({err})")) from None


def gcs_answers(timeout_s: float = 2.0) -> bool:
    """Whether the connected Ray cluster's GCS still accepts a connection.  A SIGTERM to
    the whole process group -- what `timeout`, a job scheduler or a systemd stop sends --
    ends an embedded Ray's GCS with the driver; every later call that needs the GCS
    (removing a placement group) then waits 60 s and Ray ends the process, before
    localnet can say how to resume."""
    import ray

    try:
        _connect(ray.get_runtime_context().gcs_address, timeout_s)
        return True
    except Exception:  # noqa: BLE001 - no address, refused, unreachable: not answering
        return False


def _unreachable(where: str, why: str) -> str:
    return (f"no Ray cluster at {where}: {why.rstrip('.')}.  Start one there (`ray start "
            f"--head`), or leave runtime.address and $RAY_ADDRESS unset for an embedded Ray "
            f"on this machine")


def ensure_ray(runtime, actors: int = 0) -> bool:
    """Connect to runtime.address / $RAY_ADDRESS, else start an embedded local Ray for
    `actors` actors.  Returns True when this call started (and so owns) the Ray session."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with _own_sigterm():
        _init(ray, runtime, actors)
    return True


def startup_gate(runtime, actors: int) -> int:
    """How many worker processes the embedded Ray's raylet lets start at once.  Ray's
    default is the CPUs, and the raylet tells every driver, once (workers - its 8 I/O
    workers) reach 4x that many and at each multiple after, that too many have started
    ("... tasks blocked in ray.get() calls ..."): twice for ResNet-20 per layer on 2
    cores, more for deeper nets, where an actor per layer is the design and nothing to
    fix.  So the gate widens to keep the run's own actors under the warning, with room
    for a few more workers (a recovery's new actors before the dead are reaped); below
    that, Ray's default stays (the start window paces the actors either way)."""
    default = max(1, min(os.cpu_count() or 1, int(runtime.local_cpus)))
    return max(default, (actors + 4 - 8) // 4 + 1)


@contextlib.contextmanager
def _own_sigterm():
    """ray.init makes SIGTERM a bare exit, and Ray's core worker dumps a stack for it: a
    SIGTERM handler the process had set before (`localnet run` stops as Ctrl-C stops it,
    keeping the checkpoint and naming --resume) is put back over both."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    except SystemExit as exc:  # Ray's handler, for a SIGTERM that came during ray.init
        if exc.code != signal.SIGTERM or not callable(before):
            raise
        import ray

        ray.shutdown()  # what it had started so far
        before(signal.SIGTERM, None)
        raise
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _init(ray, runtime, actors: int) -> None:
    address = cluster_address(runtime)
    if address:
        where = f"{'runtime.address' if runtime.address else '$RAY_ADDRESS'}={address}"
        _answers(address, where)
        try:
            ray.init(address=address)
        except ConnectionError as err:  # `auto` with no cluster on this machine
            raise ClusterUnreachable(_unreachable(where, str(err))) from None
    else:
        # Ray starts workers at nice 15 so that its own processes stay responsive; here
        # the actors *are* the training, and at 15 they lose every core to whatever else
        # runs on the machine.  Normal priority, unless the environment says otherwise.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray runs its own processes on the jemalloc it ships and, told so, its workers
        # too (runtime.allocator; localnet/alloc.py says why)
        os.environ["RAY_LD_PRELOAD_ON_WORKERS"] = "1" if runtime.allocator == "jemalloc" else "0"
        # Ray reserves its object store out of the memory it offers workers; the actors
        # here need that memory more (memory.py's preflight counts on it)
        # logging_level: Ray's notes on starting a private instance (that it started, that
        # token auth is on) would break into the start-up display; its errors still show.
        # "local": a private instance even beside a `ray start` on this machine, which
        # ray.init would otherwise join -- and refuse, as it takes no num_cpus there
        system = {}
        if "RAY_worker_maximum_startup_concurrency" not in os.environ:  # the user's wins
            system["worker_maximum_startup_concurrency"] = startup_gate(runtime, actors)
        ray.init(address="local", num_cpus=runtime.local_cpus, include_dashboard=False,
                 log_to_driver=False,
                 object_store_memory=runtime.local_object_store_mb << 20,
                 logging_level=logging.ERROR, _system_config=system)


def run_tasks(fn, jobs: list[tuple], runtime, *, log, failed) -> dict:
    """fn(*args) for each (name, args, num_cpus) of `jobs` as Ray tasks, as many at once
    as the cluster has room for; {name: result}.  A task that fails or is lost gives
    failed(exc) for its name only; log(name, result) as each one ends."""
    import ray

    owns = ensure_ray(runtime)
    try:
        task = ray.remote(fn)
        refs = {task.options(num_cpus=cpus).remote(*args): name for name, args, cpus in jobs}
        results, pending = {}, list(refs)
        while pending:  # no deadline on a training run; poll, so Ctrl-C stays responsive
            ready, pending = ray.wait(pending, num_returns=1, timeout=60)
            for ref in ready:
                name = refs[ref]
                try:
                    results[name] = ray.get(ref, timeout=60)
                except Exception as exc:  # noqa: BLE001 - a lost task fails its job only
                    results[name] = failed(exc)
                log(name, results[name])
        return results
    finally:
        if owns:
            ray.shutdown()


def actor_env(runtime) -> dict:
    """Environment variables for actors on a cluster this process did not start: Ray's
    own jemalloc preloaded when runtime.allocator says so.  Costs each actor Ray's
    runtime-env set-up (a Python process before the worker's).  On a node where the path
    does not exist the loader skips it and the actor runs glibc's malloc; each actor
    reports which one serves it (summary.json, "allocators")."""
    import ray

    lib = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if runtime.allocator != "jemalloc" or not lib.exists():
        return {}
    return {"LD_PRELOAD": str(lib)}


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


SETUP_HINT = (".  Each actor starts a process, imports torch and builds its part: seconds "
              "of CPU each, and actors that outnumber the cores take turns.  Raise "
              "runtime.timeout_s")


def get(refs, timeout: float, what: str, waited: float = 0.0):
    """ray.get with the runtime's errors: a MessageError as itself (naming the edge),
    a timeout naming the call, an actor's death as RuntimeError (recovery looks).
    waited: seconds already spent waiting on refs (`count_ready`), out of timeout."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=max(timeout - waited, 0.1))
    except GetTimeoutError:
        hint = SETUP_HINT if what == "setup" else ""
        raise NoReply(f"ray executor: no reply within {timeout:g} s during {what} "
                      f"(runtime.timeout_s){hint}") from None
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, MessageError):
            raise type(cause)(cause.reason, cause.src, cause.dst, cause.kind, cause.step,
                              cause.mb) from None
        if isinstance(cause, OSError):  # the machine's (a full disk): the CLI's one line
            raise OSError(f"during {what}, on an actor: {cause}") from None
        raise RuntimeError(f"a stage actor failed during {what}: "
                           f"{type(cause).__name__ if cause else ''} {cause or err}") from err
    except RayActorError as err:
        raise RuntimeError(f"a stage actor died during {what}: {err}") from err


def count_ready(refs: list, timeout: float, tell) -> float:
    """tell(how many of refs have finished), as they finish, until all have or timeout
    seconds pass; a failed one counts as finished (`get` then raises its error).
    Returns the seconds it waited (`get`'s `waited`)."""
    import ray

    t0, pending = time.monotonic(), list(refs)
    tell(0)
    while pending and time.monotonic() - t0 < timeout:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if done:
            tell(len(refs) - len(pending))
    return time.monotonic() - t0


def forget(refs: list, timeout: float) -> None:
    """Calls whose errors are only echoes of one already raised (the batch issued ahead,
    which each actor refuses once it failed): wait for them and take their errors, so Ray
    does not print each actor's traceback as an unhandled error when the refs go."""
    import ray

    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for r in refs:
        try:
            ray.get(r, timeout=0)
        except Exception:  # noqa: BLE001 - taken, not raised: the cause was raised already
            pass


def gather(refs: list, timeout: float, what: str, order=None) -> list:
    """Every actor's reply to a batch.  When one failed, wait for the rest (the abort
    frames make them stop at once) and raise the *cause*: a peer that stopped because of
    another's failure (`PeerFailed`) is only its echo, and of several actors' own errors
    (several waiting on one silent peer time out together) the first in `order` (default: the time each was raised)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return get(refs, timeout, what)
    except (MessageError, RuntimeError, TimeoutError) as first:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
        died, own = None, []
        for r in refs:
            try:
                ray.get(r, timeout=0)
            except RayActorError as err:
                died = died or err
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if not isinstance(cause, PeerFailed):
                    own.append(cause)
            except Exception:  # noqa: BLE001 - still running: the first error stands
                pass
        if died is not None:
            raise RuntimeError(f"a stage actor died during {what}: {died}") from died
        own.sort(key=order or (lambda e: getattr(e, "t", float("inf"))))
        if own and isinstance(own[0], MessageError):
            e = own[0]
            raise type(e)(e.reason, e.src, e.dst, e.kind, e.step, e.mb, e.t) from None
        if own and not isinstance(first, MessageError):
            raise RuntimeError(f"a stage actor failed during {what}: "
                               f"{type(own[0]).__name__} {own[0]}") from first
        raise
