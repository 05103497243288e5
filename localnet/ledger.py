"""Traffic ledger: messages and bytes per (edge, kind), counted by the sender.

Each worker (and the driver) keeps one; `Ledger.merged(...)` adds them up.  A message
is counted once per receiving edge: DFA's broadcast output error is one row per stage
that receives it.  Header and payload bytes are kept apart.

`parameter_bytes` counts payload bytes whose storage aliases a parameter or buffer of the
sending stage.  No message kind carries a parameter, so it stays 0; the sender checks
every payload anyway so that the claim is measured, not assumed.

`transport_bytes` counts weight transport: the bytes of forward weights that a stage's
backward pass reads under a rule that transports weights (bp), once per update -- what a
physically separate feedback pathway would have to receive to stay equal to W.  Nothing
crosses the wire for it; it is 0 for every rule but bp.  `as_summary()["parameter_bytes"]`
is the sum of both.

`MessageLog` writes a run's ledger to `RUN_DIR/messages.json` at every epoch's end.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .files import write_json


class Ledger:
    def __init__(self):
        # (src, dst, kind) -> [count, header_bytes, payload_bytes]
        self.rows: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.parameter_bytes = 0
        self.transport_bytes = 0

    def record(self, src: str, dst: str, kind: str, header_bytes: int, payload_bytes: int = 0,
               *, parameter_bytes: int = 0) -> None:
        row = self.rows[(src, dst, kind)]
        row[0] += 1
        row[1] += int(header_bytes)
        row[2] += int(payload_bytes)
        self.parameter_bytes += int(parameter_bytes)

    def record_transport(self, nbytes: int) -> None:
        """Weight transport: `nbytes` of forward weights read by a backward (see module doc)."""
        self.transport_bytes += int(nbytes)

    # -- merging and transport ------------------------------------------------------
    def merge(self, other: "Ledger") -> "Ledger":
        for key, (c, h, p) in other.rows.items():
            row = self.rows[key]
            row[0] += c
            row[1] += h
            row[2] += p
        self.parameter_bytes += other.parameter_bytes
        self.transport_bytes += getattr(other, "transport_bytes", 0)
        return self

    __iadd__ = merge

    def minus(self, earlier: "Ledger") -> "Ledger":
        """What this ledger counts beyond `earlier`, a reading of the same traffic
        taken before it (the rows that did not change are left out)."""
        out = Ledger()
        for key, row in self.rows.items():
            d = [a - b for a, b in zip(row, earlier.rows.get(key, (0, 0, 0)))]
            if any(d):
                out.rows[key] = d
        out.parameter_bytes = self.parameter_bytes - earlier.parameter_bytes
        out.transport_bytes = self.transport_bytes - earlier.transport_bytes
        return out

    def copy(self) -> "Ledger":
        return Ledger().merge(self)

    @classmethod
    def merged(cls, ledgers) -> "Ledger":
        out = cls()
        for led in ledgers:
            out.merge(led if isinstance(led, Ledger) else cls.from_dict(led))
        return out

    def to_dict(self) -> dict:
        out = {"rows": [[s, d, k, c, h, p] for (s, d, k), (c, h, p) in sorted(self.rows.items())],
               "parameter_bytes": self.parameter_bytes}
        if self.transport_bytes:
            out["transport_bytes"] = self.transport_bytes
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        led = cls()
        for s, dst, k, c, h, p in d["rows"]:
            led.rows[(s, dst, k)] = [c, h, p]
        led.parameter_bytes = d.get("parameter_bytes", 0)
        led.transport_bytes = d.get("transport_bytes", 0)
        return led

    def clear(self) -> None:
        self.rows.clear()
        self.parameter_bytes = 0
        self.transport_bytes = 0

    # -- views ----------------------------------------------------------------------
    def edges(self) -> dict[str, dict]:
        """'src->dst' -> kind -> {count, header_bytes, payload_bytes, bytes}."""
        out: dict[str, dict] = {}
        for (s, d, k), (c, h, p) in sorted(self.rows.items()):
            out.setdefault(f"{s}->{d}", {})[k] = {"count": c, "header_bytes": h,
                                                  "payload_bytes": p, "bytes": h + p}
        return out

    def as_summary(self) -> dict:
        """Per kind {count, bytes, header_bytes, payload_bytes}, plus totals and
        `parameter_bytes`."""
        kinds: dict[str, dict] = {}
        for (_, _, k), (c, h, p) in self.rows.items():
            e = kinds.setdefault(k, {"count": 0, "bytes": 0, "header_bytes": 0, "payload_bytes": 0})
            e["count"] += c
            e["header_bytes"] += h
            e["payload_bytes"] += p
            e["bytes"] += h + p
        return {**dict(sorted(kinds.items())),
                "total_bytes": sum(e["bytes"] for e in kinds.values()),
                "total_count": sum(e["count"] for e in kinds.values()),
                "parameter_bytes": self.parameter_bytes + self.transport_bytes}

    def run_summary(self, kinds=("activation", "error", "target", "control")) -> dict:
        """`as_summary()` with every kind present (zeros where none was sent) and
        parameter bytes split into `wire_parameter_bytes` (payloads aliasing a parameter:
        always 0) and `weight_transport_bytes` (bp's backward reading W)."""
        s = self.as_summary()
        for k in kinds:
            s.setdefault(k, {"count": 0, "bytes": 0, "header_bytes": 0, "payload_bytes": 0})
        s["wire_parameter_bytes"] = self.parameter_bytes
        s["weight_transport_bytes"] = self.transport_bytes
        return s

    def __repr__(self):
        return f"Ledger({self.as_summary()})"


class MessageLog:
    """`RUN_DIR/messages.json`, rewritten at every epoch end from the executor's ledger:

        edges:  "src->dst" -> kind -> {count, header_bytes, payload_bytes, bytes}
        kinds:  kind -> {count, bytes, ...}, total_bytes, total_count, parameter_bytes
        eval_bytes (evaluation), probe_bytes (metrics.bp_angle's measuring passes),
        train_bytes (the rest: training steps, mirror steps, control), samples (training
        samples), steps, bytes_per_sample = train_bytes / samples,
        per_epoch: [{epoch, step, samples, bytes, train_bytes}]
        ledger: the raw ledger (resume adds to it)

    A resumed run goes on from what its checkpoint recorded (`state()`, saved in
    checkpoint.pt), so the steps since the last epoch's end are counted once too.
    A no-op for an executor without a ledger (in-process: nothing crosses a wire)."""

    def __init__(self, run_dir: Path, ex, resume: bool = False, saved: dict | None = None):
        self.path = Path(run_dir) / "messages.json"
        self.ex = ex
        self.enabled = hasattr(ex, "ledger") and callable(getattr(ex, "ledger"))
        self.base, self.per_epoch = Ledger(), []
        self.excluded = {"eval": 0, "probe": 0}
        self._marks: dict[str, int] = {}
        if not self.enabled:
            return
        if resume and (saved is not None or self.path.exists()):
            # (a checkpoint from before `state()` was saved: the last epoch's end)
            old = saved if saved is not None else json.loads(self.path.read_text())
            self.base = Ledger.from_dict(old.get("ledger", {"rows": []}))
            self.excluded = {k: int(old.get(f"{k}_bytes", 0)) for k in self.excluded}
            self.per_epoch = list(old.get("per_epoch", []))
        else:
            self.path.unlink(missing_ok=True)

    def fetch(self):
        """(this process's ledger, the run's: base + this process's); (None, None)
        without a ledger."""
        if not self.enabled:
            return None, None
        cur = self.ex.ledger()
        return cur, Ledger().merge(self.base).merge(cur)

    def ledger(self):
        return self.fetch()[1]

    def state(self) -> dict | None:
        """What a checkpoint keeps (between steps: no evaluation or probe under way)."""
        if not self.enabled:
            return None
        return {"ledger": self.ledger().to_dict(), "per_epoch": list(self.per_epoch),
                **{f"{k}_bytes": v for k, v in self.excluded.items()}}

    @staticmethod
    def _total(led) -> int:
        return sum(h + p for _, h, p in led.rows.values())

    def begin(self, what: str, led=None) -> None:
        """Bytes from here to end(what) (or the next write) count as `what`_bytes."""
        if self.enabled:
            self._marks[what] = self._total(led or self.ledger())

    def end(self, what: str, led=None) -> None:
        if self.enabled and what in self._marks:
            self.excluded[what] += self._total(led or self.ledger()) - self._marks.pop(what)

    def write(self, epoch: int, step: int, samples: int, led=None) -> dict | None:
        if not self.enabled:
            return None
        led = led or self.ledger()
        total = self._total(led)
        for what in list(self._marks):
            self.end(what, led)
        train_bytes = total - sum(self.excluded.values())
        self.per_epoch.append({"epoch": epoch, "step": step, "samples": samples,
                               "bytes": total, "train_bytes": train_bytes})
        doc = {"edges": led.edges(), "kinds": led.as_summary(),
               **{f"{k}_bytes": v for k, v in self.excluded.items()},
               "train_bytes": train_bytes, "samples": samples, "steps": step,
               "bytes_per_sample": train_bytes / samples if samples else None,
               "per_epoch": self.per_epoch, "ledger": led.to_dict()}
        write_json(self.path, doc)
        return doc
