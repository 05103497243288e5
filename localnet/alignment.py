"""Alignment metrics, per layer: what researchers come for.

- weight angle: the angle between W and the effective feedback matrix the rule sends
  errors through (B for FA/SF/KP/WM, B_p R for PFA; W itself for BP, so 0 degrees);
- norm ratio: ||feedback|| / ||W||;
- update angle (on request): the angle between the layer's update under the rule and
  the true BP gradient on the same batch.

All angles are in degrees, between flattened tensors.
"""

from __future__ import annotations

import math

import torch

from .layers import local_layers


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return float("nan")
    cos = torch.clamp(a @ b / denom, -1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


@torch.no_grad()
def weight_alignment(module) -> dict[str, dict[str, float]]:
    """{layer: {"angle": deg, "norm_ratio": r}} for every layer with a W-shaped feedback."""
    out = {}
    for name, layer in local_layers(module):
        fb = layer.rule.effective_feedback(layer)
        if fb is None:
            continue
        w = layer.weight
        out[name] = {"angle": angle(w, fb), "norm_ratio": (fb.norm() / w.norm()).item()}
    return out


def update_angles(rule_grads: dict[str, torch.Tensor], bp_grads: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: angle(rule_grads[n], bp_grads[n]) for n in rule_grads if n in bp_grads}
