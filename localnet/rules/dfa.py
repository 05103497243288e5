"""Direct feedback alignment (Nøkland 2016, "Direct Feedback Alignment Provides
Learning in Deep Neural Networks", NeurIPS).

No error travels down the network.  Every hidden layer l receives the output error
e = dL/dy (n_classes) through its own fixed random matrix D_l (Nøkland eq. 3):

    delta_l = (D_l e) o f'(a_l)

D_l e is delivered at the layer's output (after its nonlinearity), at an
`ErrorTap`; the local derivative of the nonlinearity (and BatchNorm) is then
applied exactly by autograd.  Rule-driven layers send nothing downward.
D_l has entries N(0, 1/n) for an n-element activation, so ||D_l e|| ~ ||e||.

The output error for the batch in flight is broadcast with `output_error(e)`;
in the distributed runtime every actor receives e and sets it the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from .base import Rule, channels_last

_OUTPUT_ERROR: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "localnet_dfa_output_error", default=None)


@contextlib.contextmanager
def output_error(e: torch.Tensor):
    """Make e = dL/dlogits (batch, n_classes) visible to every tap during a backward."""
    token = _OUTPUT_ERROR.set(e)
    try:
        yield
    finally:
        _OUTPUT_ERROR.reset(token)


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, projection):
        ctx.save_for_backward(projection)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        (projection,) = ctx.saved_tensors
        e = _OUTPUT_ERROR.get()
        if e is None:
            raise RuntimeError("DFA: no output error is set; run the backward pass inside "
                               "localnet.rules.dfa.output_error(e)")
        # The incoming grad_h is discarded: DFA has no chain.
        e = e.to(projection.dtype)
        if channels_last(grad_h):
            # channels-last (`train.memory_format`): D's columns taken in (H, W, C) order,
            # so D_l e comes out in the layout of everything around it -- a row-major
            # error here would send the layer's whole backward off oneDNN's fast path
            n, c, h, w = grad_h.shape
            d = projection.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(len(projection), -1)
            return (e @ d).view(n, h, w, c).permute(0, 3, 1, 2), None
        return (e @ projection).view_as(grad_h), None


class DirectFeedbackAlignment(Rule):
    name = "dfa"
    paper = "Nøkland 2016, 'Direct Feedback Alignment Provides Learning in Deep Neural Networks'"
    broadcast_output_error = True

    def feedback(self, layer):
        # Never used to send an error (broadcast_output_error); the backward needs only
        # the weight's shape, so hand it a zero-stride placeholder, not W.
        return layer.weight.new_zeros(()).expand(layer.weight.shape)

    def effective_feedback(self, layer):
        return None  # D_l is not W-shaped: there is no W-vs-B angle for DFA

    def init_tap(self, tap, shape, num_classes):
        n = math.prod(shape)
        d = torch.randn(num_classes, n, generator=tap.generator) / math.sqrt(n)
        tap.register_buffer("projection", d)

    def tap(self, tap, h):
        return _Inject.apply(h, tap.projection)
