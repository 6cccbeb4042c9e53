"""Readable graph dumps: one file per pass, with shapes, roles, op-count diffs and timings.

`MOPC_DUMP_DIR=dir` (or the `dump_dir` option) writes, for every compiled graph,
`dir/<graph id>/NN_<pass>.txt` and an `index.json` listing the passes with timings and
op-count diffs.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

_DTYPE_ABBR = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8",
}


def describe_value(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(s) for s in val.shape)
        return f"{_DTYPE_ABBR.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe_value(v) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return "sym"
    return "" if val is None else type(val).__name__


def op_name(node: Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return f"{packet._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def op_counts(gm: GraphModule) -> Counter:
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


def op_count_diff(before: Counter, after: Counter) -> dict[str, int]:
    keys = sorted(set(before) | set(after))
    return {k: after[k] - before[k] for k in keys if after[k] != before[k]}


def _arg_str(arg: Any) -> str:
    if isinstance(arg, Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg_str(a) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, torch.dtype):
        return _DTYPE_ABBR.get(arg, str(arg))
    return repr(arg)


def format_graph(gm: GraphModule, param_fqns: dict[str, str] | None = None, roles: Any = None) -> str:
    """One line per node: `%name: type = op(args)  # role=... layer=... by=...`.

    Roles come from `meta["mopc_role"]`, else from `roles` (a RoleAnalysis), so graphs
    dumped between classification and annotation show them too.
    """
    param_fqns = param_fqns or {}
    role_of = getattr(roles, "node_roles", {})
    layer_of = getattr(roles, "node_layers", {})
    lines = []
    for node in gm.graph.nodes:
        val = describe_value(node.meta.get("val"))
        if node.op == "placeholder":
            rhs = "input"
            if node.name in param_fqns:
                rhs += f" {param_fqns[node.name]}"
        elif node.op == "output":
            lines.append(f"return {_arg_str(node.args[0])}")
            continue
        else:
            args = [_arg_str(a) for a in node.args]
            args += [f"{k}={_arg_str(v)}" for k, v in node.kwargs.items()]
            rhs = f"{op_name(node)}({', '.join(args)})"
        notes = [f"role={node.meta.get('mopc_role', role_of.get(node.name, '?'))}"]
        layer = node.meta.get("mopc_layer", layer_of.get(node.name))
        if layer is not None:
            notes.append(f"layer={layer}")
        if node.meta.get("mopc_created_by") not in (None, "capture"):
            notes.append(f"by={node.meta['mopc_created_by']}")
        lines.append(f"%{node.name}: {val} = {rhs}  # {' '.join(notes)}")
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def resolve_dump_dir(option: str | None) -> Path | None:
    path = option or os.environ.get("MOPC_DUMP_DIR")
    return Path(path) if path else None


class DumpWriter:
    """Writes a graph's pass-by-pass dumps under `root/<graph_id>/`."""

    def __init__(self, root: Path, graph_id: str, param_fqns: dict[str, str] | None = None) -> None:
        self.dir = Path(root) / _safe(graph_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.param_fqns = dict(param_fqns or {})
        self.entries: list[dict[str, Any]] = []

    def write(self, step_name: str, gm: GraphModule, *, kind: str, seconds: float,
              diff: dict[str, int] | None, note: str = "", roles: Any = None) -> Path:
        index = len(self.entries)
        path = self.dir / f"{index:02d}_{_safe(step_name)}.txt"
        if diff is None:
            diff_text = "n/a (not a rewrite of the previous graph)"
        else:
            diff_text = ", ".join(f"{'+' if v > 0 else ''}{v} {k}" for k, v in diff.items()) or "no change"
        header = [
            f"# mopc graph {self.dir.name!r} after {step_name} ({kind}, {seconds * 1e3:.2f} ms)",
            f"# op-count diff: {diff_text}",
            f"# nodes: {len(gm.graph.nodes)}",
        ]
        if note:
            header.append(f"# {note}")
        path.write_text("\n".join(header) + "\n" + format_graph(gm, self.param_fqns, roles))
        from mopc.passes.analysis.collectives import graph_collectives

        self.entries.append({"index": index, "pass": step_name, "kind": kind, "seconds": seconds,
                             "op_count_diff": diff or {}, "file": path.name, "note": note,
                             "collectives": [c.as_dict() for c in graph_collectives(gm)]})
        (self.dir / "index.json").write_text(json.dumps(self.entries, indent=2))
        return path
