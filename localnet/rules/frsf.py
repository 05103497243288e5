"""Fixed random-magnitude sign-concordant feedback, frSF (Moskovitz, Litwin-Kumar &
Abbott 2018, "Feedback alignment in deep convolutional networks", sec. 2).

B = |M| o sign(W): magnitudes |M| drawn once at init, M drawn like the layer's initial
weights (`model.init`; BioTorch draws it with the same init as W), signs following W.
"""

import torch

from .base import draw_like_weights
from .usf import SignConcordant


class FixedRandomSignConcordant(SignConcordant):
    name = "frsf"
    paper = "Moskovitz et al. 2018 (fixed random-magnitude sign-concordant feedback)"

    def init_layer(self, layer):
        m = torch.empty_like(layer.weight.detach())
        draw_like_weights(m, layer.init_scheme, layer.generator)
        layer.register_buffer("feedback_magnitude", m.abs_())

    def magnitude(self, layer):
        return layer.feedback_magnitude
