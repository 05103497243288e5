"""Kolen-Pollack feedback (Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019,
"Deep Learning without Weight Transport", NeurIPS; after Kolen & Pollack 1994).

The error sent down is B^T delta.  B learns with exactly W's update: both receive
the same local gradient dW = delta x^T (computable at the synapse from the pre- and
post-synaptic signals), the same weight decay and the same momentum, so

    W_{t+1} - B_{t+1} = (1 - eta*lambda) (W_t - B_t)      (plain SGD, Akrout eq. 8)

and B converges to W without ever reading it.  B starts random (Xavier-uniform).
"""

import torch.nn as nn

from .base import RandomFeedbackOptions, Rule, random_feedback


class KolenPollack(Rule):
    name = "kp"
    Options = RandomFeedbackOptions
    paper = "Akrout et al. 2019, 'Deep Learning without Weight Transport' (Kolen-Pollack)"

    def init_layer(self, layer):
        # trained by the layer's own optimizer
        layer.feedback_weight = nn.Parameter(random_feedback(self, layer))

    def feedback(self, layer):
        return layer.feedback_weight

    def feedback_grad(self, grad_w):
        return grad_w
