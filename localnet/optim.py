"""torch.optim.SGD, without importing torch._dynamo.

torch.optim marks its methods as not to be compiled, lazily: the first call of
`Optimizer.zero_grad`, `state_dict`, ... and every `step` imports torch._dynamo to do so.
localnet never compiles, and that import costs every Ray actor seconds of CPU and
a large share of its private memory (`python benchmarks/scaling.py --baseline` measures
both; RESULTS.md has the figures) -- multiplied by every actor of a per-layer run.

`SGD` is torch.optim.SGD with the same update (the same code runs), minus that import:
the optimizer's methods are marked "not compiled" up front, and `step` calls the
undecorated function under no_grad, which is what the decorator adds when not compiling.
A test checks it against torch.optim.SGD bit for bit and that torch._dynamo stays out.
"""

from __future__ import annotations

import torch
import torch._compile

_STEP = torch.optim.SGD.step
while hasattr(_STEP, "__wrapped__"):
    _STEP = _STEP.__wrapped__


def _mark_not_compiled() -> None:
    # each `_disable_dynamo` wrapper caches torch._dynamo.disable(fn) on fn; cache fn
    # itself, so the wrapper calls it as it is (what disable() does outside compilation)
    code = torch._compile._disable_dynamo(lambda: None).__code__
    for cls in (torch.optim.Optimizer, torch.optim.SGD):
        for attr in vars(cls).values():
            if getattr(attr, "__code__", None) is code:
                setattr(attr.__wrapped__, "__dynamo_disable", attr.__wrapped__)


_mark_not_compiled()


class SGD(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        # The fused kernel walks a parameter and its gradient as flat memory, so a
        # gradient laid out unlike its parameter (a row-major g_R for a channels-last R,
        # `train.memory_format`) would update the wrong elements: lay it out alike first.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.stride() != p.stride():
                    p.grad = torch.empty_like(p).copy_(p.grad)
        return _STEP(self, closure)
