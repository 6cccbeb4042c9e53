"""mopc: a Mixture-of-Parallelisms compiler, as the `mop` backend of `torch.compile`.

    torch.compile(model, backend="mop", options={...})

`backend="mop"` resolves through the package's `torch_dynamo_backends` entry point, so no
import is needed once mopc is installed; importing mopc registers the backend by hand
when the package runs from a source tree without that entry point.
"""

from __future__ import annotations

from mopc import logs
from mopc.analysis import Analysis, analyze
from mopc.backend import mop
from mopc.config import MoPConfig, MoPConfigError
from mopc.parallelize import (
    clip_grad_norm_,
    data_parallel_rank,
    parallelize,
    plan_of,
    shard_sequence,
)
from mopc.runtime.compression import compression_stats
from mopc.runtime.experts import expert_load_stats
from mopc.runtime.guard import CollectiveError, InputMismatchError, NonFiniteError
from mopc.runtime.pipeline_step import pipeline_stats

__all__ = ["Analysis", "CollectiveError", "InputMismatchError", "MoPConfig", "MoPConfigError", "NonFiniteError", "analyze",
           "clip_grad_norm_", "compression_stats", "data_parallel_rank", "expert_load_stats", "mop", "parallelize", "pipeline_stats", "plan_of",
           "shard_sequence"]
__version__ = "0.1.0"


def _register_without_entry_point() -> None:
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if any(ep.name == "mop" for ep in entry_points(group="torch_dynamo_backends")):
        return  # Dynamo loads us through the entry point and registers `mop` itself
    if "mop" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=mop, name="mop")


_register_without_entry_point()
logs.configure()  # MOPC_LOG
