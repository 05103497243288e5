"""Traffic ledger: messages and bytes per (edge, kind), counted by the sender.

Each worker (and the driver) keeps one; `Ledger.merged(...)` adds them up.  A message
is counted once per receiving edge: DFA's broadcast output error is one row per stage
that receives it.  Header and payload bytes are kept apart.

`parameter_bytes` counts payload bytes whose storage aliases a parameter or buffer of the
sending stage.  No message kind carries a parameter, so it stays 0; the sender checks
every payload anyway so that the claim is measured, not assumed.
"""

from __future__ import annotations

from collections import defaultdict


class Ledger:
    def __init__(self):
        # (src, dst, kind) -> [count, header_bytes, payload_bytes]
        self.rows: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.parameter_bytes = 0

    def record(self, src: str, dst: str, kind: str, header_bytes: int, payload_bytes: int = 0,
               *, parameter_bytes: int = 0) -> None:
        row = self.rows[(src, dst, kind)]
        row[0] += 1
        row[1] += int(header_bytes)
        row[2] += int(payload_bytes)
        self.parameter_bytes += int(parameter_bytes)

    # -- merging and transport ------------------------------------------------------
    def merge(self, other: "Ledger") -> "Ledger":
        for key, (c, h, p) in other.rows.items():
            row = self.rows[key]
            row[0] += c
            row[1] += h
            row[2] += p
        self.parameter_bytes += other.parameter_bytes
        return self

    __iadd__ = merge

    @classmethod
    def merged(cls, ledgers) -> "Ledger":
        out = cls()
        for led in ledgers:
            out.merge(led if isinstance(led, Ledger) else cls.from_dict(led))
        return out

    def to_dict(self) -> dict:
        return {"rows": [[s, d, k, c, h, p] for (s, d, k), (c, h, p) in self.rows.items()],
                "parameter_bytes": self.parameter_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        led = cls()
        for s, dst, k, c, h, p in d["rows"]:
            led.rows[(s, dst, k)] = [c, h, p]
        led.parameter_bytes = d.get("parameter_bytes", 0)
        return led

    def clear(self) -> None:
        self.rows.clear()
        self.parameter_bytes = 0

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
                "parameter_bytes": self.parameter_bytes}

    def __repr__(self):
        return f"Ledger({self.as_summary()})"
