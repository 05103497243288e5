"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, Nat. Commun. 7:13276).

The error sent down is B^T delta with B a fixed random matrix of W's shape
(Xavier-uniform here, times `rule.feedback_gain`); B never changes.  W still learns from
its own input and the error it receives, dW = delta x^T, and comes to align with B.
"""

from .base import RandomFeedbackOptions, Rule, random_feedback


class FeedbackAlignment(Rule):
    name = "fa"
    Options = RandomFeedbackOptions
    paper = "Lillicrap et al. 2016, 'Random synaptic feedback weights support error backpropagation'"

    def init_layer(self, layer):
        layer.register_buffer("feedback_weight", random_feedback(self, layer))

    def feedback(self, layer):
        return layer.feedback_weight
