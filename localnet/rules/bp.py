"""Backpropagation: the reference, not a local rule.

The error sent down is W^T delta (Rumelhart, Hinton & Williams 1986): the backward
pass reads the forward weights, i.e. it *transports* them.  Everything else in
localnet is measured against it.
"""

from .base import Rule


class Backprop(Rule):
    name = "bp"
    paper = "Rumelhart, Hinton & Williams 1986 (reference; transports weights)"
    transports_weights = True

    def feedback(self, layer):
        return layer.weight
