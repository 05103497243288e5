"""Helpers for testing the runtime against the in-process engine (used by the tests)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import InProcessExecutor
from ..builders import as_config, build_rule_and_model, optim_config


def reference(cfg, input_shape, num_classes, boundaries=None):
    """The in-process executor for cfg (what `localnet.train.build` makes), and its model."""
    cfg = as_config(cfg)
    _, model = build_rule_and_model(cfg, input_shape, num_classes)
    ex = InProcessExecutor(model, optim_config(cfg), micro_batches=cfg.train.micro_batches,
                           boundaries=boundaries)
    return ex, model


class _Edge(torch.autograd.Function):
    """One edge of the layer graph through its channels: the activation through the
    activation codec going up, the error through the error codec coming down."""

    @staticmethod
    def forward(ctx, x, up, down):
        ctx.down = down
        return up(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.down(g), None, None


def codec_on_every_edge(cfg, input_shape, num_classes, data, lr=0.05, wd=1e-3):
    """What per-layer channels without delay or drop must compute, made another way: the
    whole model in one process, each edge of its layer graph a codec round trip each way
    (deterministic codecs only: no shared random stream), autograd summing the errors of
    a tensor read twice, one step per batch of `data`.  Returns the model."""
    from ..channels.channel import make_channel
    from ..stage import Stage

    cfg = as_config(cfg)
    _, model = build_rule_and_model(cfg, input_shape, num_classes)
    nodes = model.layer_graph()
    stage = Stage(list(model.units), optim_config(cfg), first=True, names=model.unit_names)
    trip = {}
    for c, n in enumerate(nodes):
        for p in (p for p in n.inputs if p >= 0):
            a = make_channel(cfg.channel, "activation", nodes[p].name, n.name).codec
            e = make_channel(cfg.channel, "error", n.name, nodes[p].name).codec
            trip[p, c] = (lambda t, k=a: k.decode(k.encode(t)),
                          lambda t, k=e: k.decode(k.encode(t)))
    M = cfg.train.micro_batches
    for x, y in data:
        for xm, ym in zip(x.chunk(M), y.chunk(M)):
            outs = []
            for c, n in enumerate(nodes):
                outs.append(n.module(*[xm if p < 0 else _Edge.apply(outs[p], *trip[p, c])
                                       for p in n.inputs]))
            (F.cross_entropy(outs[-1], ym, reduction="sum") / x.shape[0]).backward()
        stage.step(lr, wd)
    return model


def batches(n: int, batch_size: int, input_shape, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, *input_shape, generator=g),
             torch.randint(0, num_classes, (batch_size,), generator=g)) for _ in range(n)]


def state_diff(a: dict, b: dict) -> tuple[float, list[str]]:
    """Largest absolute difference over the tensors of two model state dicts, and the
    keys whose extra state (layer RNGs) differs.  Raises if the key sets differ."""
    if set(a) != set(b):
        raise AssertionError(f"state keys differ: {sorted(set(a) ^ set(b))[:5]}")
    worst, rng = 0.0, []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
        elif isinstance(x, dict):  # _extra_state: {"rng": ByteTensor}
            if any(not torch.equal(x[j], y[j]) for j in x):
                rng.append(k)
    return worst, rng


def tensors_of(state: dict) -> dict[str, torch.Tensor]:
    """Every float parameter/buffer with at least 2 elements in a model state dict."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)
            and v.is_floating_point() and v.numel() >= 2}


def leaks(payload, tensors: dict[str, torch.Tensor], cos_limit: float = 0.99) -> list[str]:
    """Names of the tensors that `payload` reproduces: equal to a parameter or buffer, to
    its transpose, or to its sign -- up to scale (|cosine| >= cos_limit over flattened
    values).  Only same-sized tensors can match."""
    if isinstance(payload, torch.Tensor):
        p = payload.detach().double().flatten()
    else:  # a writable copy (audit payloads come back from Ray read-only)
        p = torch.from_numpy(np.array(payload, dtype=np.float64)).flatten()
    if p.numel() < 2 or p.norm() == 0:
        return []
    out = []
    for name, w in tensors.items():
        if w.numel() != p.numel():
            continue
        w = w.double()
        cands = {"value": w, "sign": w.sign()}
        if w.dim() >= 2:
            cands["transpose"] = w.transpose(0, 1)
            cands["sign transpose"] = w.sign().transpose(0, 1)
        for how, c in cands.items():
            c = c.flatten()
            if c.norm() == 0:
                continue
            if torch.equal(c, p) or abs((c @ p) / (c.norm() * p.norm())).item() >= cos_limit:
                out.append(f"{name} ({how})")
    return out
