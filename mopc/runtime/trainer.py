"""A small training loop for `mopc train`: synthetic data, AdamW, progress, JSON report.

The data is learnable on purpose (arithmetic token sequences over the first 256 tokens:
each sequence starts at a random token and steps by a random stride), so the loss
visibly falls within a few steps and two runs can be compared step by step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("mopc")


def synthetic_batch(step: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch `step` of the arithmetic-sequence task: input_ids and next-token labels."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    span = min(vocab, 256)  # a small alphabet: the loss falls within a few steps
    start = torch.randint(0, span, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    pos = torch.arange(seq_len + 1).unsqueeze(0)
    tokens = (start + stride * pos) % span
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


class Progress:
    """A one-line progress bar on stderr (a plain line per step when not a terminal)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()

    def update(self, done: int, **fields: Any) -> None:
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.start
        info = "  ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{self.label} [{bar}] {done}/{self.total}  {elapsed:6.1f}s  {info}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@dataclass
class TrainReport:
    model: str
    backend: str
    steps: int
    batch: int
    seq_len: int
    num_params: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0
    tokens_per_second: float = 0.0
    dump_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def train(
    model: torch.nn.Module,
    *,
    model_name: str,
    steps: int,
    batch: int,
    seq_len: int,
    vocab: int,
    backend: str | Callable = "mop",
    options: dict[str, Any] | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> TrainReport:
    """Train `model` for `steps` AdamW steps on synthetic data; first step includes compile."""
    compiled = model if backend == "eager" else torch.compile(model, backend=backend, options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    report = TrainReport(model=model_name, backend=str(backend), steps=steps, batch=batch, seq_len=seq_len,
                         num_params=sum(p.numel() for p in model.parameters()),
                         dump_dir=(options or {}).get("dump_dir"))
    bar = Progress(steps, f"train {model_name} ({backend})") if progress else None
    for step in range(steps):
        data = synthetic_batch(step, batch, seq_len, vocab, seed)
        start = time.perf_counter()
        loss = compiled(**data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        report.losses.append(float(loss.detach()))
        report.step_seconds.append(seconds)
        if bar:
            bar.update(step + 1, loss=f"{report.losses[-1]:.4f}", step_s=f"{seconds:.2f}")
    if steps > 1:
        report.compile_seconds = report.step_seconds[0] - sum(report.step_seconds[1:]) / (steps - 1)
        report.tokens_per_second = batch * seq_len * (steps - 1) / sum(report.step_seconds[1:])
    return report


def write_json(report: TrainReport, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(report.to_json())
