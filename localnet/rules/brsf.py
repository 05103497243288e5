"""Batchwise random-magnitude sign-concordant feedback, brSF (Moskovitz,
Litwin-Kumar & Abbott 2018, "Feedback alignment in deep convolutional networks").

B = |M| o sign(W) with M ~ N(0, c^2) redrawn after every optimizer step (every
batch), c the Xavier std; the draw uses the layer's own RNG.
"""

import torch

from .frsf import FixedRandomSignConcordant
from .base import xavier_std


class BatchRandomSignConcordant(FixedRandomSignConcordant):
    name = "brsf"
    paper = "Moskovitz et al. 2018 (batchwise random-magnitude sign-concordant feedback)"

    def after_step(self, layer):
        m = layer.feedback_magnitude
        m.copy_(torch.randn(m.shape, generator=layer.generator, dtype=m.dtype).abs_()
                .mul_(xavier_std(m.shape)))
