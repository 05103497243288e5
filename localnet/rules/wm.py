"""Weight mirror (Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019, "Deep Learning
without Weight Transport", NeurIPS, sec. 3).

The error sent down is B^T delta.  B learns in separate *mirror* steps: the layer's
input is driven with noise x ~ N(0, sigma^2 I), the layer computes its ordinary
forward response y = W x (for a conv, the same convolution), and

    B <- (1 - lambda_m) B + eta_m * E[y x^T]          (Akrout eq. 6-7)

Since E[y x^T] = sigma^2 W, B comes to mirror W using only the layer's own input and
output, never a read of W in the backward pass.  Noise is independent per layer and
drawn from the layer's own RNG.  For a conv, E[y x^T] takes the conv-weight-gradient
form; the noise is a small patch and the mirror conv uses no padding, so every output
position sees a full receptive field and E[y x^T] = sigma^2 W holds exactly.
With lambda_m = eta_m * sigma^2 (the default) the fixed point is B = W.
"""

import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import NoOptions
from .base import ConvGeometry, RandomFeedbackOptions, Rule, random_feedback


class MirrorOptions(NoOptions):
    """The mirror steps (`rule.mirror.*`)."""

    sigma: float = Field(1.0, gt=0, description="std of the noise driven into each layer")
    lr: float = Field(0.01, gt=0, description="eta_m")
    decay: float | None = Field(None, ge=0, le=1,
                                description="lambda_m; default lr*sigma^2 (fixed point B = W)")
    batch: int = Field(16, ge=1, description="noise samples per mirror step")
    warmup_steps: int = Field(100, ge=0, description="mirror steps before training")
    every: int = Field(1, ge=1, description="one mirror step every N training steps")


class WeightMirror(Rule):
    name = "wm"
    graph_safe = False  # mirror steps draw from the layer's host RNG between updates
    paper = "Akrout et al. 2019, 'Deep Learning without Weight Transport' (weight mirror)"

    class Options(RandomFeedbackOptions):
        mirror: MirrorOptions = MirrorOptions()

    def __init__(self, **options):
        super().__init__(**options)
        m = self.options.mirror
        self.sigma, self.lr, self.batch = m.sigma, m.lr, m.batch
        self.decay = m.lr * m.sigma ** 2 if m.decay is None else m.decay
        self.warmup_steps, self.mirror_every = m.warmup_steps, m.every

    def on_start(self, executor) -> None:
        # mirror B before the first update (rule.mirror.warmup_steps), so training starts
        # from feedback already aligned with W rather than from a random B
        if self.warmup_steps:
            executor.mirror_steps(self.warmup_steps)

    def init_layer(self, layer):
        layer.register_buffer("feedback_weight", random_feedback(self, layer))

    def feedback(self, layer):
        return layer.feedback_weight

    @torch.no_grad()
    def mirror_step(self, layer):
        w, g = layer.weight, layer.generator
        if isinstance(layer.geometry, ConvGeometry):
            geo = layer.geometry
            kh, kw = w.shape[2:]
            # input patch giving a 4x4 output with no padding
            size = [(k - 1) * d + 1 + s * 3 for k, d, s in zip((kh, kw), geo.dilation, geo.stride)]
            x = torch.randn(self.batch, w.shape[1] * geo.groups, *size, generator=g,
                            dtype=w.dtype).to(w.device) * self.sigma
            y = F.conv2d(x, w, None, geo.stride, 0, geo.dilation, geo.groups)
            corr = torch.nn.grad.conv2d_weight(x, w.shape, y, geo.stride, 0,
                                               geo.dilation, geo.groups)
            corr /= self.batch * y.shape[2] * y.shape[3]
        else:
            x = torch.randn(self.batch, w.shape[1], generator=g, dtype=w.dtype).to(w.device)
            x *= self.sigma
            y = x @ w.t()
            corr = y.t() @ x / self.batch
        layer.feedback_weight.mul_(1 - self.decay).add_(corr, alpha=self.lr)

    def describe(self):
        return f"wm(sigma={self.sigma}, lr={self.lr}, decay={self.decay})"
