"""1F1B (PipeDream-flush; Narayanan et al. 2019/2021): warm up, then one forward and
one backward in turn, then the flush and one update."""

from .base import STEP, B, F, PipelineSchedule, depths


class OneFOneB(PipelineSchedule):
    name = "1f1b"

    def stages(self, S, M, graph):
        """Stage s warms up with d(s) forwards (S-1-s on a chain; d = edges on the longest
        path to the last stage), then alternates one forward and one backward, then cools
        down with the remaining backwards.  Same maths as GPipe; a stage holds at most
        d(s)+1 micro-batches' activations instead of M."""
        out = []
        for d in depths(graph):
            warm = min(d, M)
            acts = [F(m) for m in range(warm)]
            for f in range(warm, M):
                acts += [F(f), B(f - warm)]
            acts += [B(m) for m in range(M - warm, M)] + [STEP]
            out.append(acts)
        return out
