"""One epoch of PFA's MNIST setting on the real data reaches the accuracy floors.

The floors sit just under what the authors' own implementation reaches at the same
budget over seeds 0-2 (BP 96.2-96.7, PFA 91.8-93.4, FA 85.4-90.4)."""

import os
from pathlib import Path

import pytest

from localnet.config import load_config
from localnet.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("LOCALNET_DATA") or str(ROOT.parent / "shared" / "data")

pytestmark = [
    pytest.mark.slow,
    # CI always has the data: there a missing dataset must fail, not skip
    pytest.mark.skipif(not (Path(DATA) / "MNIST" / "raw").is_dir() and not os.environ.get("CI"),
                       reason=f"real MNIST not found under {DATA}"),
]


@pytest.mark.parametrize("rule, floor", [("bp", 0.95), ("pfa", 0.91), ("fa", 0.84)])
def test_one_epoch_mnist_floor(tmp_path, rule, floor):
    cfg = load_config(ROOT / "configs/mnist_mlp.yaml",
                      [f"rule.name={rule}", "train.epochs=1", f"data.root={DATA}",
                       "train.threads=1"])  # robust to a busy machine: 2 threads can stall
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.batch_size) == (0.01, 0.9, 64)
    summary = train(cfg, tmp_path, progress=False)
    assert summary["steps"] == 60000 // 64
    assert summary["test_accuracy"] >= floor, summary["test_accuracy"]
