"""`mopc.analyze(model, example_inputs)`: roles, bytes and flops of a model's training step.

The step (forward, loss, backward) is traced into one joint ATen graph with `make_fx`.
Fake tensors are tried first (nothing is allocated, so a trillion-parameter model built on
`meta` is analysed in seconds); a model whose routing reads token counts back to Python
(`.tolist()`, data-dependent loops) cannot be traced symbolically, so it is then traced by
running it once for real on its (small) weights: that follows the Python control flow of
one concrete routing, which is exactly what sees through Dynamo's graph breaks. (The same
fallback covers ops whose fake kernel is narrower than their CPU kernel, such as fp32
`aten._grouped_mm`, whose meta function accepts bf16 only.)
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx.traceback as fx_traceback
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from mopc.passes.analysis.costs import CostAnalysis, estimate_costs, human_bytes, human_count
from mopc.passes.analysis.role_defs import PARAM_ROLES, RoleAnalysis, layer_of
from mopc.passes.analysis.roles import classify_graph

log = logging.getLogger("mopc")

try:  # moved between torch releases
    from torch._functorch._aot_autograd.logging_utils import setup_stacktrace_preservation_hooks
except ImportError:  # pragma: no cover
    from torch._functorch._aot_autograd.utils import setup_stacktrace_preservation_hooks  # type: ignore


def default_loss(output: Any) -> torch.Tensor:
    """The scalar a model's output stands for: itself, `.loss`, `["loss"]` or a first element."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 else output.float().mean()
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    if isinstance(output, (tuple, list)) and output:
        return default_loss(output[0])
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.float().mean()
    raise TypeError(
        f"cannot find a loss in the model output of type {type(output).__name__}; "
        "pass loss_fn=... to mopc.analyze"
    )


@dataclass(frozen=True)
class TracedStep:
    """A joint forward+backward graph of one training step."""

    gm: GraphModule
    param_fqns: Mapping[str, str]
    """placeholder name -> parameter or buffer path"""
    trainable: frozenset[str]
    num_fwd_outputs: int
    mode: str
    """"fake" or "real" (see the module docstring)"""


def _is_data_dependent(err: BaseException) -> bool:
    names = {"GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException",
             "UnsupportedOperatorException", "PendingUnbackedSymbolNotFound"}
    while err is not None:
        text = str(err)
        if type(err).__name__ in names or any(
                s in text for s in ("data-dependent", "data dependent", "_local_scalar_dense")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _is_fake_kernel_limit(err: BaseException) -> bool:
    """An op whose fake (meta) kernel rejects what its real kernel accepts."""
    while err is not None:
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith("_meta_registrations.py"):
                return True
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return False


def _real_like(t: torch.Tensor, low_high: tuple[int, int]) -> torch.Tensor:
    if t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor):
        return t
    if t.is_floating_point():
        return torch.randn(t.shape, dtype=t.dtype)
    return torch.randint(*low_high, t.shape, dtype=t.dtype)


def trace_step(
    model: torch.nn.Module,
    example_inputs: tuple | dict,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> TracedStep:
    """Trace forward, loss and backward of `model` into one ATen graph."""
    loss_fn = loss_fn or default_loss
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable_names = [k for k, p in params.items() if p.requires_grad]
    state = {**params, **buffers}
    names = list(state)

    if not trainable_names:
        raise ValueError("mopc.analyze: the model has no parameter with requires_grad=True, so there is no "
                         "training step to analyse; unfreeze at least one parameter")

    @torch.enable_grad()  # analysing under torch.no_grad() still traces the backward
    def step(state: dict, args: tuple, kwargs: dict) -> tuple:
        out = torch.func.functional_call(model, state, args, kwargs)
        loss = loss_fn(out)
        if loss.grad_fn is not None:
            setup_stacktrace_preservation_hooks([loss.grad_fn])
        grads = torch.autograd.grad(loss, [state[k] for k in trainable_names], allow_unused=True)
        return loss, grads

    def run(mode: str, st: dict, a: tuple, kw: dict) -> GraphModule:
        # a real trace follows one concrete routing; values read back to Python
        # (`.item()`, `.tolist()`, range checks) become constants of this graph
        extra = {"_error_on_data_dependent_ops": False} if mode == "real" else {}
        with fx_traceback.preserve_node_meta(), _quiet():
            return make_fx(step, tracing_mode=mode, **extra)(st, a, kw)

    try:
        gm, mode = run("fake", state, args, kwargs), "fake"
    except Exception as err:  # noqa: BLE001 - filtered just below
        if not (_is_data_dependent(err) or _is_fake_kernel_limit(err)):
            raise
        if any(t.device.type == "meta" for t in state.values()):
            if _is_data_dependent(err):
                raise RuntimeError(
                    "this model's routing depends on token values (it reads counts back to Python), "
                    "so it can only be analysed by running it once; its parameters are on the meta "
                    "device. Build it on cpu at a small size to analyse it."
                ) from err
            raise
        vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), default=2)
        real = lambda x: _real_like(x, (0, vocab)) if isinstance(x, torch.Tensor) else x  # noqa: E731
        a = tuple(real(x) for x in args)
        kw = {k: real(v) for k, v in kwargs.items()}
        log.info("fake tracing failed (%s: %s); tracing one real step instead",
                 type(err).__name__, str(err).splitlines()[0][:200])
        gm, mode = run("real", state, a, kw), "real"
    placeholders = gm.graph.find_nodes(op="placeholder")
    fqns = {ph.name: name for ph, name in zip(placeholders, names)}
    return TracedStep(gm, fqns, frozenset(trainable_names), 1, mode)


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class LayerRow:
    name: str
    roles: tuple[str, ...]
    num_params: int
    param_bytes: int
    saved_activation_bytes: int
    flops: int


@dataclass(frozen=True)
class Analysis:
    """What `mopc.analyze` found: roles of every parameter and node, bytes and flops."""

    param_roles: Mapping[str, str]
    roles: RoleAnalysis
    costs: CostAnalysis
    traced: TracedStep
    param_bytes: Mapping[str, int]
    param_numel: Mapping[str, int]

    @property
    def graph(self) -> GraphModule:
        return self.traced.gm

    def params_with_role(self, role: str) -> list[str]:
        return [k for k, r in self.param_roles.items() if r == role]

    def layer_rows(self) -> list[LayerRow]:
        groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"roles": set(), "numel": 0, "bytes": 0,
                                                                  "saved": 0, "flops": 0})

        def key(layer: int | None, role: str) -> str:
            if layer is not None:
                return f"layer {layer}"
            return "embedding" if role == "embedding" else "head"

        for fqn, role in self.param_roles.items():
            g = groups[key(layer_of(fqn), role)]
            g["roles"].add(role)
            g["numel"] += self.param_numel[fqn]
            g["bytes"] += self.param_bytes[fqn]
        for node, layer in self.roles.node_layers.items():
            role = self.roles.node_roles.get(node, "other")
            g = groups[key(layer, role)]
            g["flops"] += self.costs.flops.get(node, 0)
            g["saved"] += self.costs.saved_bytes.get(node, 0)

        def order(name: str) -> tuple[int, int]:
            if name == "embedding":
                return (0, 0)
            if name.startswith("layer "):
                return (1, int(name.split()[1]))
            return (2, 0)

        return [LayerRow(name, tuple(r for r in PARAM_ROLES if r in g["roles"]), g["numel"], g["bytes"],
                         g["saved"], g["flops"]) for name, g in sorted(groups.items(), key=lambda kv: order(kv[0]))]

    def summary(self) -> str:
        """A table per layer: roles, parameters, parameter bytes, saved activations, flops."""
        rows = self.layer_rows()
        header = ("layer", "roles", "params", "param bytes", "saved act.", "step flops")
        body = [(r.name, ",".join(r.roles), human_count(r.num_params), human_bytes(r.param_bytes),
                 human_bytes(r.saved_activation_bytes), human_count(r.flops)) for r in rows]
        total = ("total", "", human_count(sum(r.num_params for r in rows)),
                 human_bytes(sum(r.param_bytes for r in rows)),
                 human_bytes(sum(r.saved_activation_bytes for r in rows)),
                 human_count(sum(r.flops for r in rows)))
        table = [header, *body, total]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths)))
        rule = "  ".join("-" * w for w in widths)
        lines = [fmt(header), rule, *map(fmt, body), rule, fmt(total)]
        counts = defaultdict(int)
        for role in self.param_roles.values():
            counts[role] += 1
        lines.append("")
        lines.append("parameters by role: " + ", ".join(f"{r}={counts[r]}" for r in PARAM_ROLES if counts[r]))
        for b in self.roles.moe_blocks:
            lines.append(f"MoE block (layer {b.layer}): {b.num_experts} experts, top-{b.top_k}, "
                         f"router {','.join(b.router_params)}, {len(b.expert_params)} expert and "
                         f"{len(b.shared_expert_params)} shared-expert tensors")
        lines.append(f"traced with {self.traced.mode} tensors; {len(self.graph.graph.nodes)} nodes in the joint graph")
        return "\n".join(lines)


def analyze(
    model: torch.nn.Module,
    example_inputs: tuple | dict,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> Analysis:
    """Classify every parameter and node of `model`'s training step.

    `example_inputs` is a tuple of positional arguments or a dict of keyword arguments;
    real, meta or fake tensors (only shapes and dtypes matter, unless routing reads token
    values back to Python, see the module docstring). `loss_fn` maps the model's output to
    the scalar loss (default: :func:`default_loss`).
    """
    traced = trace_step(model, example_inputs, loss_fn)
    roles = classify_graph(traced.gm, traced.param_fqns, set(traced.trainable), traced.num_fwd_outputs)
    costs = estimate_costs(traced.gm, roles.forward_nodes)
    params = dict(model.named_parameters())
    known = {**roles.buffer_roles, **roles.param_roles}  # frozen parameters are classified as state
    param_roles = {k: known.get(k, "other") for k in params}
    return Analysis(
        param_roles=param_roles,
        roles=roles,
        costs=costs,
        traced=traced,
        param_bytes={k: p.numel() * p.element_size() for k, p in params.items()},
        param_numel={k: p.numel() for k, p in params.items()},
    )
