"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, Nat. Commun. 7:13276).

The error sent down is B^T delta with B a fixed random matrix of W's shape
(Xavier-uniform here); B never changes.  W still learns from its own input and the
error it receives, dW = delta x^T, and comes to align with B.
"""

import torch.nn as nn

from .base import Rule


class FeedbackAlignment(Rule):
    name = "fa"
    paper = "Lillicrap et al. 2016, 'Random synaptic feedback weights support error backpropagation'"

    def init_layer(self, layer):
        b = layer.weight.detach().new_empty(layer.weight.shape)
        nn.init.xavier_uniform_(b, generator=layer.generator)
        layer.register_buffer("feedback_weight", b)

    def feedback(self, layer):
        return layer.feedback_weight
