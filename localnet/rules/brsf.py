"""Batchwise random-magnitude sign-concordant feedback, brSF (Moskovitz,
Litwin-Kumar & Abbott 2018, "Feedback alignment in deep convolutional networks").

B = |M| o sign(W) with M redrawn after every optimizer step (every batch), drawn like
the layer's initial weights (`model.init`); the draw uses the layer's own RNG.
"""

from .frsf import FixedRandomSignConcordant
from .base import draw_like_weights


class BatchRandomSignConcordant(FixedRandomSignConcordant):
    name = "brsf"
    paper = "Moskovitz et al. 2018 (batchwise random-magnitude sign-concordant feedback)"
    graph_safe = False  # a fresh draw from the layer's host RNG every step

    def after_step(self, layer):
        m = layer.feedback_magnitude
        draw_like_weights(m, layer.init_scheme, layer.generator).abs_()
