"""localnet: deep networks trained by local plasticity rules, each layer or block a Ray
actor (README.md)."""

import time as _time

# When this process began loading localnet.  In an actor that is the start of its own
# start-up, before `import torch` (the runtime's start-up account, StageWorker.info).
LOADED_AT = _time.time()
