"""Runnable studies (``python -m experiments.<name>``).

Importing this package, which every ``python -m experiments.<name>`` does before jax starts, turns
off XLA's concurrency-optimised CPU scheduler unless ``XLA_FLAGS`` already sets it: that scheduler
keeps rematerialised activations alive, so without it ``remat='dots'`` (the experiments' default)
needs less than half the memory. The flag is process-wide and only acts if jax has not started yet.
"""

import os

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()
