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
"""

from __future__ import annotations

from collections import defaultdict


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
