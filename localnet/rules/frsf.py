"""Fixed random-magnitude sign-concordant feedback, frSF (Moskovitz, Litwin-Kumar &
Abbott 2018, "Feedback alignment in deep convolutional networks", sec. 2).

B = |M| o sign(W): magnitudes |M| drawn once at init (M ~ N(0, c^2), c the Xavier
std), signs following W.
"""

import torch

from .base import xavier_std
from .usf import SignConcordant


class FixedRandomSignConcordant(SignConcordant):
    name = "frsf"
    paper = "Moskovitz et al. 2018 (fixed random-magnitude sign-concordant feedback)"

    def init_layer(self, layer):
        w = layer.weight.detach()
        m = torch.randn(w.shape, generator=layer.generator, dtype=w.dtype)
        layer.register_buffer("feedback_magnitude", (m * xavier_std(w.shape)).abs())

    def magnitude(self, layer):
        return layer.feedback_magnitude
