"""`MOPC_LOG`: log levels per component, read like `TORCH_LOGS`.

    MOPC_LOG=+passes,ep      # mopc.passes at DEBUG (per-pass timings), mopc.ep at INFO
    MOPC_LOG=all             # every mopc logger at INFO; `+all` for DEBUG
    MOPC_LOG=guard,-ep       # the step guard at INFO, only errors from expert parallelism

A name alone means INFO, `+name` DEBUG, `-name` ERROR. Components left out keep the
logging module's defaults (WARNING). When `MOPC_LOG` is set and nothing else has given the
`mopc` logger a handler, mopc adds one that writes to stderr with the rank in each line.

Structured traces: with `TORCH_TRACE=dir` (PyTorch's structured trace, read by
`tlparse`), every pass's graph and the partitioned forward and backward graphs are also
written as `artifact` entries named `mopc_<graph>_<NN>_<pass>`, next to Dynamo's and
Inductor's own entries for the same compilation.
"""

from __future__ import annotations

import logging
import os
import sys

COMPONENTS = {
    "mopc": "mopc",  # the backend, mopc.parallelize, the trainer, memory and comm accounting
    "passes": "mopc.passes",
    "ep": "mopc.ep",
    "compression": "mopc.compression",
    "guard": "mopc.guard",
}
"""`MOPC_LOG` name -> logger; `all` means every one of them."""

_LEVELS = {"+": logging.DEBUG, "-": logging.ERROR, "": logging.INFO}


def parse(spec: str) -> dict[str, int]:
    """`"+passes,ep"` -> {"mopc.passes": DEBUG, "mopc.ep": INFO}; unknown names are errors."""
    levels: dict[str, int] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        sign = item[0] if item[0] in "+-" else ""
        name = item[len(sign):]
        if name == "all":
            for logger in COMPONENTS.values():
                levels[logger] = _LEVELS[sign]
        elif name in COMPONENTS:
            levels[COMPONENTS[name]] = _LEVELS[sign]
        else:
            raise ValueError(
                f"MOPC_LOG={spec!r}: unknown component {name!r}; use a comma-separated list of "
                f"{', '.join(['all', *COMPONENTS])}, each optionally prefixed by + (debug) or - (errors only)"
            )
    return levels


class _RankFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rank = os.environ.get("RANK")
        prefix = f"[rank{rank}]" if rank is not None else ""
        return f"{prefix}{record.levelname[0]} {self.formatTime(record, '%H:%M:%S')} {record.name}] " \
               f"{record.getMessage()}"


def configure(spec: str | None = None) -> dict[str, int]:
    """Apply `spec` (default: the `MOPC_LOG` environment variable); returns the levels set."""
    spec = os.environ.get("MOPC_LOG", "") if spec is None else spec
    levels = parse(spec)
    if not levels:
        return levels
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger("mopc")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_RankFormatter())
        root.addHandler(handler)
        root.propagate = False  # one line per message, not one more from the root logger
    return levels


def trace_graph(name: str, payload: object) -> None:
    """One `artifact` entry of PyTorch's structured trace (`TORCH_TRACE`); free when off."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                     payload_fn=lambda: payload() if callable(payload) else payload)


__all__ = ["COMPONENTS", "configure", "parse", "trace_graph"]
