"""The pass registry: every graph pass of mopc, by name, with its ordering constraints.

A pass has one signature, `fn(gm, ctx, **options)`: analysis passes return a frozen
result (stored in `ctx.results[name]`) and never mutate the graph; rewrite passes return
the (possibly new) GraphModule. Options are bound from the config when the pipeline is
built (`options_from_config`), never read from globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from mopc.config import MoPConfig

PassKind = Literal["analysis", "rewrite"]


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[..., Any]
    kind: PassKind
    requires: tuple[str, ...]
    """Passes that must run earlier in the same pipeline."""
    numerics: Literal["exact", "approx"]
    """`exact` passes preserve losses and gradients bit for bit or within fp32 rounding of
    reassociation; `approx` passes (compression, lower precision) are opt-in."""
    enabled: Callable[[MoPConfig], bool]
    """Whether the pass belongs in the pipeline for a config."""
    options_from_config: Callable[[MoPConfig], dict[str, Any]]
    order: int
    """Position among passes that are not in `pipeline.PIPELINE` (extensions, tests)."""

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


PASSES: dict[str, PassSpec] = {}


def register_pass(
    *,
    kind: PassKind,
    requires: tuple[str, ...] = (),
    numerics: Literal["exact", "approx"] = "exact",
    enabled: Callable[[MoPConfig], bool] = lambda config: True,
    options_from_config: Callable[[MoPConfig], dict[str, Any]] = lambda config: {},
    order: int | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as a pass named after the function."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        pass_name = name or fn.__name__
        if pass_name in PASSES and PASSES[pass_name].fn is not fn:
            raise ValueError(f"a pass named {pass_name!r} is already registered")
        PASSES[pass_name] = PassSpec(
            name=pass_name, fn=fn, kind=kind, requires=tuple(requires), numerics=numerics,
            enabled=enabled, options_from_config=options_from_config,
            order=len(PASSES) * 10 if order is None else order,
        )
        return fn

    return wrap


def unregister_pass(name: str) -> None:
    """Remove a pass (tests register temporary ones)."""
    PASSES.pop(name, None)
