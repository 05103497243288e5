"""Uniform sign-concordant feedback, uSF (Liao, Leibo & Poggio 2016, "How important
is weight symmetry in backpropagation?", AAAI; Moskovitz, Litwin-Kumar & Abbott 2018,
"Feedback alignment in deep convolutional networks", arXiv:1812.06488).

The error sent down is B^T delta with B = c * sign(W), c the std of the layer's initial
weights (`model.init`: the Xavier std under xavier, as Moskovitz et al. sec. 2 and
BioTorch; torch's default init's std otherwise).  B follows sign(W) as W learns.  Only sign(W) is read,
once per forward pass; the backward pass sees B alone.
"""

import torch

from .base import Rule, init_std


class SignConcordant(Rule):
    """B = magnitude(layer) * sign(W); subclasses choose the magnitude."""

    def magnitude(self, layer):
        raise NotImplementedError

    def feedback(self, layer):
        with torch.no_grad():  # only the sign of W is read, and no gradient flows through it
            return self.magnitude(layer) * torch.sign(layer.weight)


class UniformSignConcordant(SignConcordant):
    name = "usf"
    paper = "Liao et al. 2016; Moskovitz et al. 2018 (uniform sign-concordant feedback)"

    def init_layer(self, layer):
        layer.sign_scale = init_std(layer.weight.shape, layer.init_scheme)

    def magnitude(self, layer):
        return layer.sign_scale
