"""Table helpers shared by the benchmark scripts (they run as scripts: `benchmarks/` is on sys.path)."""

from __future__ import annotations

MEMORY_ROWS = (("params", "params"), ("grads", "grads"), ("optimizer", "optimizer"),
               ("activations (peak)", "activations_peak"), ("peak", "peak"), ("peak RSS", "peak_rss"))
"""(row label, key of a `mopc train --json` per-rank memory record)."""


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def render(names: list[str], rows: list[tuple[str, list[str]]], *, min_col: int, corner: str = "",
           fit_names: bool = False, fit_values: bool = True) -> str:
    """Rows of right-aligned columns, one per configuration in `names`, under a header line."""
    width = max(len(label) for label, _ in rows)
    col = max(min_col, *((len(n) for n in names) if fit_names else ()),
              *((len(v) for _, vals in rows for v in vals) if fit_values else ()))
    lines = [f"{corner:{width}}  " + "  ".join(f"{n:>{col}}" for n in names)]
    lines += [f"{label:{width}}  " + "  ".join(f"{v:>{col}}" for v in vals) for label, vals in rows]
    return "\n".join(lines)
