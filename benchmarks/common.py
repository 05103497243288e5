"""What every benchmark records next to its numbers: the machine and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hardware_cpu() -> str:
    """CPU model, cores, torch and Python versions."""
    import torch

    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def commit() -> str:
    """The short hash of HEAD ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def write_section(tag: str, lines: list[str]) -> None:
    """Put `lines` into benchmarks/RESULTS.md between <!-- tag --> and <!-- /tag -->
    (replacing what was there, or appended)."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    section = "\n".join([start, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    a, b = text.find(start), text.find(end)
    if a >= 0 and b > a:
        text = text[:a] + section + text[b + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
