"""GPipe (Huang et al. 2019): every forward, then every backward, then one update."""

from .base import STEP, B, F, PipelineSchedule


class GPipe(PipelineSchedule):
    name = "gpipe"

    def stages(self, S, M, graph):
        """All forwards, then all backwards (ascending micro-batch), then the step.  The
        last stage runs each backward right after its forward: its error exists as soon
        as its logits do, so there is nothing to wait for and it holds one micro-batch
        instead of M.  Nothing steps before STEP, so the order changes no number."""
        fill_drain = [F(m) for m in range(M)] + [B(m) for m in range(M)] + [STEP]
        last = [a for m in range(M) for a in (F(m), B(m))] + [STEP]
        return [list(fill_drain) for _ in range(S - 1)] + [last]
