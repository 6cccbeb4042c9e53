"""The planner: per-rank memory and step time of any layout at any scale, and the search.

    result = mopc.planner.plan("1t", gpus=96, gpu="h200", seq_len=1 << 20)
    result.chosen            # the fastest runnable layout that fits (an Estimate), or the smallest
    result.projection        # the fastest fitting layout that needs features mopc lacks (flagged)
    result.fsdp2             # the FSDP2 baseline's estimate and the longest sequence it fits

See `probe.py` (what is measured from the compiled program), `model.py` (exact shard
bytes), `estimate.py` (the memory and time model) and `search.py`.
"""

from mopc.planner.estimate import Candidate, Estimate, routing_skew
from mopc.planner.hardware import HARDWARE, HardwareSpec, hardware
from mopc.planner.search import (
           PlanResult,
           estimate_layout,
           fsdp2_estimate,
           load_model_config,
           plan,
)

__all__ = ["HARDWARE", "Candidate", "Estimate", "HardwareSpec", "PlanResult", "estimate_layout", "fsdp2_estimate",
           "hardware", "load_model_config", "plan", "routing_skew"]
