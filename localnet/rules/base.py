"""The machinery every local rule shares: one autograd op and the Rule interface.

A layer computes y = op(x, W) + b.  Its backward pass has three outputs, and a
local rule decides each one:

  (a) the error sent to the layer below: op_input_grad(delta, F), where F is the
      *feedback* weight the rule hands over at forward time;
  (b) the forward-weight update: op_weight_grad(x, delta) -- the layer's own input
      and the error it received, the same for every rule;
  (c) the gradient of the feedback weights (KP and PFA learn them from (b)).

Locality is structural: `LocalOp` saves x and F for backward, never W.  So once the
forward pass is over, nothing any rule but `bp` does (where F *is* W) can read W.
Sign rules hand over F = c*sign(W), a fresh tensor, so they see only sign(W).

Conv backward uses `aten.convolution_backward` directly, as autograd's own conv backward
does: grad_weight from x (the kernel needs only the weight's shape, never its values),
grad_input through F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..registry import NoOptions, Registry


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class LinearGeometry:
    """y = x W^T + b, for x of shape (..., N_in)."""

    def forward(self, x, w, b):
        return F.linear(x, w, b)

    def backward(self, grad_y, x, feedback, w_shape, need_x, need_w, need_b):
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gx = (grad_y @ feedback) if need_x else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1])) if need_w else None
        gb = g2.sum(0) if need_b else None
        return gx, gw, gb


@dataclass(frozen=True)
class ConvGeometry:
    """2-d convolution with any stride, padding, dilation and groups."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def forward(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_y, x, feedback, w_shape, need_x, need_w, need_b):
        if feedback is None:  # weight grad only: the kernel needs a shape, not values
            feedback = x.new_zeros(()).expand(w_shape)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, x, feedback,
            [w_shape[0]] if need_b else None,
            list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, [need_x, need_w, need_b],
        )
        return gx, gw, gb


def channels_last(t: torch.Tensor) -> bool:
    """Whether a tensor is stored channels-last (`train.memory_format`) and not also
    row-major: 4-d, dense in (N, H, W, C) order."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the op
class LocalOp(torch.autograd.Function):
    """y = geometry(x, W, b) whose backward is decided by a local rule (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, rule, *feedback):
        # Deliberately not saving `weight`: only x and the feedback tensors survive.
        ctx.save_for_backward(x, *feedback)
        ctx.geometry, ctx.rule = geometry, rule
        ctx.w_shape = weight.shape
        ctx.has_bias = bias is not None
        return geometry.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, *feedback = ctx.saved_tensors
        rule, geo = ctx.rule, ctx.geometry
        need_x = ctx.needs_input_grad[0] and not rule.broadcast_output_error
        need_fb = ctx.needs_input_grad[5:]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        # (b) the forward-weight update, delta x^T, identical for every rule; and, when
        # the rule's feedback is one W-shaped tensor F, (a) op^T(F) delta in the same call
        f = feedback[0] if len(feedback) == 1 and feedback[0].shape == ctx.w_shape else None
        gx, gw, gb = geo.backward(grad_y, x, f, ctx.w_shape, need_x and f is not None,
                                  True, need_b)
        # (a) and (c): the rule's call
        gx, gfb = rule.backward(geo, grad_y, x, tuple(feedback), gw, gx, need_x, need_fb)
        return (gx, gw if ctx.needs_input_grad[1] else None, gb, None, None, *gfb)


# ----------------------------------------------------------------------------- rules
RULES = Registry("rule")


class RandomFeedbackOptions(NoOptions):
    """Options of the rules whose B starts as a fixed random matrix (fa, kp, wm)."""

    feedback_gain: float = Field(1.0, gt=0, description="B is Xavier-uniform times this "
                                 "gain: the scale of the errors sent down")


class Rule:
    """A local plasticity rule.  Stateless: the state it needs (B, R, M, ...) lives on
    the layer as buffers or parameters, so checkpoints and devices just work.

    A rule is one file: a subclass that sets `name` is registered by defining it, and
    its `Options` model is what the config accepts under `rule:` beside the name.
    Subclasses override what differs from the defaults below.
    """

    name: str = ""
    paper: str = ""
    Options: type[BaseModel] = NoOptions
    # -- capabilities, which the executors read instead of the rule's name
    # True only for bp: its backward reads W (weight transport).
    transports_weights: bool = False
    # True for DFA: no error goes to the layer below; the last stage broadcasts the
    # output error e, and each hidden layer's tap projects it (the runtime sends e to
    # every stage instead of chaining errors down).
    broadcast_output_error: bool = False
    # mirror_step(layer) runs after every `mirror_every`-th update (wm's option).
    mirror_every: int = 1
    # False for a rule whose step draws random numbers on the host or reads tensors
    # back (brsf, wm): a CUDA graph of the step would replay one draw forever (graphs.py).
    graph_safe: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        RULES.add(cls)

    def __init__(self, **options):
        self.options = RULES.options(self.name, options, "rule")

    def on_start(self, executor) -> None:
        """Once, before a fresh run's first step (not on resume): what the rule does to
        the whole network first, through the executor's interface (wm: mirror steps)."""

    # -- state ---------------------------------------------------------------------
    def init_layer(self, layer) -> None:
        """Register feedback state on a freshly built layer (W is already initialised)."""

    def init_tap(self, tap, shape: torch.Size, num_classes: int) -> None:
        """Register state on an error tap once its activation shape is known (DFA)."""

    # -- (a) and (c) -----------------------------------------------------------------
    def feedback(self, layer) -> torch.Tensor:
        """The feedback weight F, computed at forward time; backward sends op^T(F) delta."""
        raise NotImplementedError

    def feedback_tensors(self, layer, x) -> tuple[torch.Tensor, ...]:
        """What the backward pass may use, fixed at forward time (default: F alone)."""
        return (self.feedback(layer),)

    def feedback_grad(self, grad_w):
        """Gradient for F given the layer's weight gradient (None: F is not learned by SGD)."""
        return None

    def backward(self, geometry, grad_y, x, feedback, grad_w, grad_x, need_x, need_fb):
        """(a) the error sent down and (c) gradients for the feedback tensors.

        grad_x arrives already computed as op^T(F) delta when the feedback is a single
        W-shaped F (the common case); rules with other feedback compute their own."""
        return grad_x, (self.feedback_grad(grad_w) if need_fb[0] else None,)

    def tap(self, tap, h: torch.Tensor) -> torch.Tensor:
        """What an error tap after a hidden layer does; identity except for DFA."""
        return h

    # -- hooks the trainer calls --------------------------------------------------------
    def before_step(self, layer) -> None:
        """Called before every optimizer step, once the step's gradients are all in:
        a rule that collects a gradient itself completes it here (PFA's g_R)."""

    def drop_grads(self, layer) -> None:
        """Called with the stage's zero_grad: forget gradients the rule collects itself."""

    def after_step(self, layer) -> None:
        """Called after every optimizer step (e.g. brSF redraws its magnitudes)."""

    def mirror_step(self, layer) -> None:
        """One weight-mirror step (only `wm` does anything)."""

    def weights_changed(self, layer) -> None:
        """The layer's tensors were changed where the rule did not see it (a replayed
        CUDA graph of whole steps): forget anything derived from them (PFA's B_p R)."""

    def effective_feedback(self, layer) -> torch.Tensor | None:
        """The matrix compared with W by the alignment metrics (None when not W-shaped)."""
        with torch.no_grad():
            return self.feedback(layer).detach()

    def describe(self) -> str:
        return self.name


INITS = ("torch", "xavier")


def init_std(weight_shape, scheme: str = "torch") -> float:
    """Std of a forward weight of this shape under an init scheme: "torch" is
    nn.Linear / nn.Conv2d's default (Kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in)), std
    1/sqrt(3 fan_in)); "xavier" is Xavier-uniform (std sqrt(2/(fan_in+fan_out)))."""
    if scheme == "xavier":
        return xavier_std(weight_shape)
    if scheme == "torch":
        return 1.0 / math.sqrt(3 * math.prod(weight_shape[1:]))
    raise ValueError(f"model.init must be one of {INITS}, got {scheme!r}")


def draw_like_weights(t: torch.Tensor, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """Fill t (in place) from the distribution forward weights of its shape start from
    under `scheme` -- what the authors' code draws feedback magnitudes and PFA's R from."""
    with torch.no_grad():
        if scheme == "xavier":
            return torch.nn.init.xavier_uniform_(t, generator=generator)
        if scheme == "torch":
            return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    raise ValueError(f"model.init must be one of {INITS}, got {scheme!r}")


def xavier_std(weight_shape, gain: float = 1.0) -> float:
    """Std of Xavier (Glorot) init for a Linear or Conv weight shape."""
    fan_out = weight_shape[0] * math.prod(weight_shape[2:])
    fan_in = math.prod(weight_shape[1:])
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def random_feedback(rule: "Rule", layer) -> torch.Tensor:
    """A fixed random B of W's shape: Xavier-uniform, times the rule's `feedback_gain`
    option (`RandomFeedbackOptions`) -- the scale of the errors sent down."""
    b = layer.weight.detach().new_empty(layer.weight.shape)
    torch.nn.init.xavier_uniform_(b, gain=float(rule.options.feedback_gain),
                                  generator=layer.generator)
    return b
