"""Product feedback alignment, PFA (Li & Benna 2024, "Deep Learning without Weight
Symmetry", arXiv:2405.20594).

The feedback pathway is a product of two matrices owned by the layer:
a fixed random B_p (N_out x r*N_out; for a conv a 1x1 kernel) and a plastic R
(r*N_out x N_in; for a conv r*C_out x C_in x k x k).  The error sent down is

    R^T B_p^T delta,

and R learns locally from the same signal as W:  g_R = B_p^T g_W, with weight decay
on W and on R.  Then R -> B_p^T W and B_p R -> B_p B_p^T W ~ W (B_p B_p^T ~ I).
B_p is Xavier-uniform with gain sqrt((1 + 1/r)/2), which makes E[B_p B_p^T] = I;
PFA-o (`ortho: true`) uses a square orthogonal B_p (r = 1), where B_p B_p^T = I.

Fused, unlike the published r-fold convolutions: W_eff = B_p R is formed once per
value of R (a small matmul) and the error goes down with one transposed conv through
W_eff.  g_R = B_p^T g_W is linear in g_W, so the layer sums the g_W of a step's
micro-batches and forms g_R once, just before the optimizer step (`before_step`):
with M micro-batches that is 2 matmuls per step instead of 2M, the same sum up to
rounding, so micro-batching does not multiply PFA's extra work (`benchmarks/RESULTS.md`,
rule_cost, has the step costs).  R changes only at optimizer steps -- `before_step` drops the
cached product -- or through in-place writes that bump its version (load_state_dict,
copy_), which the cache checks.

For a Linear layer fed fewer samples than it has outputs (an MLP at batch 64), the
other association is cheaper and gives the same numbers: d = delta B_p once, then the
error d R and g_R = d^T x.  `mode: auto` picks whichever costs fewer multiply-adds
(`factored` applies to Linear layers only; convs are always fused).

A grouped conv gets a block-diagonal B_p (one block per group), so the feedback of
each group stays within it, as the forward weights do.
"""

import math
import weakref
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..registry import NoOptions
from .base import LinearGeometry, Rule, channels_last, draw_like_weights


class _GradSum:
    """The g_W of a step's fused passes, summed, until `before_step` turns it into g_R."""

    __slots__ = ("total",)

    def __init__(self):
        self.total = None

    def add(self, g):
        # g is also W's gradient, which autograd may keep as W.grad and add into: copy
        self.total = g.clone() if self.total is None else self.total.add_(g)


class _Product(torch.autograd.Function):
    """W_eff = B_p R already formed (`w_eff`), whose gradient -- the layer's g_W, as
    `feedback_grad` says -- goes into the layer's _GradSum instead of through the
    matmul: R gets it at the step, as B_p^T (sum of g_W)."""

    @staticmethod
    def forward(ctx, r, w_eff, grads):
        ctx.grads = grads
        return w_eff.view_as(w_eff)

    @staticmethod
    def backward(ctx, g):
        ctx.grads.add(g)
        return None, None, None


def _times(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """m @ t over t's first axis (B_p R, B_p^T g_W), t of any rank, in t's layout.  A
    channels-last conv tensor (`train.memory_format`) is multiplied as the (H, W, C)-
    ordered matrix it lies as, with no copy, and the product comes out channels-last
    too: the same sums, and a W_eff laid out like the conv's input and error, which
    keeps the conv on oneDNN's fast path."""
    if channels_last(t):
        n, c, h, w = t.shape
        out = m @ t.permute(0, 2, 3, 1).reshape(n, -1)
        return out.view(len(m), h, w, c).permute(0, 3, 1, 2)
    return (m @ t.flatten(1)).view(len(m), *t.shape[1:])


class ProductFeedbackAlignment(Rule):
    name = "pfa"
    paper = "Li & Benna 2024, 'Deep Learning without Weight Symmetry' (product feedback alignment)"

    class Options(NoOptions):
        r: int = Field(10, ge=1, description="expansion ratio: R is (r*n_out) x n_in")
        ortho: bool = Field(False, description="PFA-o: square orthogonal B_p (r = 1)")
        mode: Literal["auto", "fused", "factored"] = Field(
            "auto", description="association: fused W_eff = B_p R, or factored (delta B_p) R")

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.r, self.ortho, self.mode = (1 if o.ortho else o.r), o.ortho, o.mode

    def init_layer(self, layer):
        w = layer.weight.detach()
        n_out, hidden = w.shape[0], self.r * w.shape[0]
        # A grouped conv's feedback stays within its groups: B_p is block-diagonal, one
        # block per group, so W_eff = B_p R has W's group structure.
        groups = getattr(layer.geometry, "groups", 1)
        b_p = w.new_zeros(n_out, hidden)
        n, h = n_out // groups, hidden // groups
        for g in range(groups):
            block = b_p[g * n:(g + 1) * n, g * h:(g + 1) * h]
            if self.ortho:
                nn.init.orthogonal_(block, generator=layer.generator)
            else:
                nn.init.xavier_uniform_(block, gain=math.sqrt((1 + 1 / self.r) / 2),
                                        generator=layer.generator)
        layer.register_buffer("feedback_fixed", b_p)
        r = w.new_empty(hidden, *w.shape[1:])
        draw_like_weights(r, layer.init_scheme, layer.generator)  # R drawn like W
        layer.feedback_plastic = nn.Parameter(r)

    def feedback(self, layer):
        """W_eff = B_p R, in W's shape."""
        return _times(layer.feedback_fixed, layer.feedback_plastic)

    def _factored(self, layer, x) -> bool:
        if not isinstance(layer.geometry, LinearGeometry):
            return False  # convs are always fused: many positions per sample make it cheap
        if self.mode != "auto":
            return self.mode == "factored"
        n = x.numel() // x.shape[-1]               # samples
        n_out, hidden, n_in = layer.feedback_fixed.shape[0], layer.feedback_fixed.shape[1], x.shape[-1]
        fused = 2 * n_out * hidden * n_in          # W_eff = B_p R, and g_R = B_p^T g_W
        factored = n * n_out * hidden + 2 * n * hidden * n_in   # d = delta B_p, d R, d^T x
        return factored < fused

    def feedback_tensors(self, layer, x):
        if self._factored(layer, x):
            return (layer.feedback_fixed, layer.feedback_plastic)
        r = layer.feedback_plastic
        cache = layer.__dict__.get("_pfa_w_eff")
        key = (r._version, layer.feedback_fixed._version)
        if cache is None or cache[0]() is not r or cache[1] != key:
            with torch.no_grad():
                cache = (weakref.ref(r), key, self.feedback(layer))
            layer.__dict__["_pfa_w_eff"] = cache
        if not (r.requires_grad and torch.is_grad_enabled()):
            return (cache[2],)
        grads = layer.__dict__.setdefault("_pfa_grads", _GradSum())
        return (_Product.apply(r, cache[2], grads),)

    def before_step(self, layer):
        layer.__dict__.pop("_pfa_w_eff", None)   # R is about to change (fused SGD: in place)
        grads = layer.__dict__.get("_pfa_grads")
        if grads is None or grads.total is None:
            return
        r = layer.feedback_plastic
        g_r = _times(layer.feedback_fixed.t(), grads.total)
        r.grad = g_r if r.grad is None else r.grad.add_(g_r)
        grads.total = None

    def weights_changed(self, layer):
        layer.__dict__.pop("_pfa_w_eff", None)

    def drop_grads(self, layer):
        grads = layer.__dict__.get("_pfa_grads")
        if grads is not None:
            grads.total = None

    def feedback_grad(self, grad_w):
        return grad_w  # fused: _Product sums it; before_step makes g_R = B_p^T g_W

    def backward(self, geometry, grad_y, x, feedback, grad_w, grad_x, need_x, need_fb):
        if len(feedback) == 1:  # fused: grad_x came through W_eff
            return super().backward(geometry, grad_y, x, feedback, grad_w, grad_x, need_x, need_fb)
        b_p, r = feedback
        d = grad_y.reshape(-1, grad_y.shape[-1]) @ b_p         # B_p^T delta, per sample
        gx = (d @ r).view(*grad_y.shape[:-1], r.shape[1]) if need_x else None
        g_r = d.t() @ x.reshape(-1, x.shape[-1]) if need_fb[1] else None   # = B_p^T g_W
        return gx, (None, g_r)

    def describe(self):
        return f"pfa(r={self.r}{', ortho' if self.ortho else ''})"
