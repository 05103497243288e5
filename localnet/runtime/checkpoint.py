"""Per-actor checkpoints: every actor writes its own file, the coordinator a manifest.

    RUN_DIR/checkpoint/step-<N>/stage<i>.pt     one actor's weights, feedback weights,
                                                optimizer state, steps and RNG states
    RUN_DIR/checkpoint/step-<N>/manifest.json   actors, files, bytes, partition, step
    RUN_DIR/checkpoint/manifest.json            the latest generation

No tensor passes through the coordinator.  The two newest generations are kept, so a
crash while saving leaves the previous one whole.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..files import write_json

CHECKPOINT_DIR = "checkpoint"


def save(ex, run_dir) -> tuple[Path, dict]:
    """Every actor of executor `ex` writes its own file; then the manifests.  Returns the
    generation's directory and its manifest."""
    root = Path(run_dir).resolve() / CHECKPOINT_DIR
    gen, n = root / f"step-{ex._step:09d}", 0
    while _other_layout(gen, ex._layout()["placement"]):
        n += 1  # a resume that re-cut this step's checkpoint: keep the old cut's files
        gen = root / f"step-{ex._step:09d}.{n}"
    refs = [w.save_checkpoint.remote(str(gen)) for w in ex.workers]
    try:
        receipts = ex._get(refs, "checkpoint")
    except BaseException:  # a generation without its manifest is never read: free its space
        ex._settle(refs)  # once the other actors are done writing into it
        shutil.rmtree(gen, ignore_errors=True)
        raise
    manifest = {"version": 1, "run_id": ex.run_id, "step": ex._step, "time": time.time(),
                "schedule": ex.schedule_name, "micro_batches": ex.micro_batches,
                **ex._layout(), "actors": receipts, "bytes": sum(r["bytes"] for r in receipts)}
    write_json(gen / "manifest.json", manifest)
    write_json(root / "manifest.json", {**manifest, "generation": gen.name})
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-2]:
        if old != gen:
            shutil.rmtree(old, ignore_errors=True)
    return gen, manifest


def _other_layout(gen: Path, placement: dict) -> bool:
    """Does generation `gen` hold a whole checkpoint cut otherwise?  (Writing the same
    step again in the same cut, e.g. an epoch's end on a checkpoint_every step, may
    overwrite it: its files hold the same state.)"""
    try:
        return json.loads((gen / "manifest.json").read_text()).get("placement") != placement
    except (OSError, ValueError):
        return False  # none, or no manifest: a generation never read


def read_manifest(run_dir, saved: dict) -> tuple[Path, dict]:
    gen = Path(run_dir).resolve() / saved["checkpoint"]
    path = gen / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint manifest {path}: the run directory is "
                                f"incomplete (or not on a filesystem every node shares)")
    return gen, json.loads(path.read_text())
