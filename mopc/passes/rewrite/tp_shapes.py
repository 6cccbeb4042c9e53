"""Shape rules of the tensor-parallel rewrite: which pieces of each dim grew or shrank.

Under tensor parallelism of degree T a block runs on the T ranks' tokens stacked on the
outermost dim (all-gather order: rank-major) and on this rank's contiguous chunk of heads
or columns. One size per dim does not say where the change sits once a view has merged
dims: `[B, H, S, D] -> [B·H, S, D]` keeps 2·4 = 4·2 on the merged dim while its batch
grew and its heads shrank, and splitting it back needs to know which is which.

So every dim is described by its *atoms*, outermost first, each `(old, new)`: its size in
the reference program and on tensor-parallel shapes. An atom is unchanged (`old == new`),
grown (`new = T·old`: the T ranks' copies stacked, rank-major) or shrunk
(`new = old / T`: this rank's contiguous chunk). Atoms are kept canonical: an atom
absorbs the unchanged atoms inside it (a chunk of the outer index over a whole inner
range is a chunk of the flat range; so is a rank-major stack), and `(1, 1)` atoms are
dropped, so two dims mean the same layout exactly when their atoms are equal.

Rules (all exact, or `Unsupported`):
* a view groups input and output dims whose products are equal and deals the group's
  atoms, outermost first, to the group's output dims; an atom is split only when the
  split is exact: its change goes to the outer piece, which must stay whole;
* permutes, transposes, (un)squeezes and matmuls move the dims they move;
* every other op keeps dims in place (broadcasting from the right): an output dim takes
  the atoms of the input dims with its sizes, and inputs that disagree are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.fx import Node

aten = torch.ops.aten

Atom = tuple[int, int]  # (size in the reference program, size on tensor-parallel shapes)
Dims = list[list[Atom]]  # per dim, its atoms outermost first (canonical)


class Unsupported(Exception):
    """This block cannot be tensor-parallelized; it keeps the reference layout."""


# ------------------------------------------------------------------------ atoms


def canonical(atoms: Sequence[Atom]) -> list[Atom]:
    """Merge each atom with the unchanged atoms inside it; drop `(1, 1)`."""
    out: list[Atom] = []
    for old, new in atoms:
        if old == new == 1:
            continue
        if out and old == new:
            o, n = out[-1]
            out[-1] = (o * old, n * new)
        else:
            out.append((old, new))
    return out


def plain_dims(old: Sequence[int], new: Sequence[int]) -> Dims:
    """One atom per dim: what a tensor from outside the block looks like."""
    if len(old) != len(new):
        raise Unsupported(f"rank changed: {list(old)} -> {list(new)}")
    return [canonical([(o, n)]) for o, n in zip(old, new)]


def new_size(atoms: Sequence[Atom]) -> int:
    return _prod(n for _, n in atoms)


def old_size(atoms: Sequence[Atom]) -> int:
    return _prod(o for o, _ in atoms)


def grows(atoms: Sequence[Atom]) -> bool:
    return any(n > o for o, n in atoms)


def shrinks(atoms: Sequence[Atom]) -> bool:
    return any(n < o for o, n in atoms)


def changed(atoms: Sequence[Atom]) -> bool:
    return any(n != o for o, n in atoms)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


# ------------------------------------------------------------------------ views


def view_groups(old_in: list[int], old_out: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims whose products are equal."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj and (i >= len(old_in) or old_in[i] != 1) and (j >= len(old_out) or old_out[j] != 1):
                break
            if pi <= pj and i < len(old_in):
                pi *= old_in[i]
                gi.append(i)
                i += 1
            elif j < len(old_out):
                pj *= old_out[j]
                gj.append(j)
                j += 1
            elif i < len(old_in):
                pi *= old_in[i]
                gi.append(i)
                i += 1
            else:
                break
        if pi != pj:
            raise Unsupported(f"view {old_in} -> {old_out} has no dim grouping")
        groups.append((gi, gj))
    return groups


def view_dims(in_dims: Dims, old_in: list[int], old_out: list[int]) -> Dims:
    """The atoms of a view's output dims (their new sizes are `new_size` of each)."""
    out: Dims = [[] for _ in old_out]
    for gi, gj in view_groups(old_in, old_out):
        atoms = [a for k in gi for a in in_dims[k]]
        if not gj:
            if changed(atoms):
                raise Unsupported(f"view {old_in} -> {old_out} drops a changed dim")
            continue
        for j, dealt in zip(gj, _deal(atoms, [old_out[j] for j in gj], old_in, old_out)):
            out[j] = canonical(dealt)
    return out


def _deal(atoms: list[Atom], sizes: list[int], old_in, old_out) -> list[list[Atom]]:
    """Give each output size (outermost first) the atoms whose old sizes multiply to it."""
    atoms = list(atoms)
    dealt: list[list[Atom]] = []
    for size in sizes:
        got: list[Atom] = []
        need = size
        if size == 1 and atoms and atoms[0][1] > atoms[0][0] > 1:
            # a stack on a merged dim goes to a size-1 outer dim (a batch of one sequence)
            old, new = atoms.pop(0)
            got.append((1, new // old))
            atoms.insert(0, (old, old))
        while atoms and (need > 1 or atoms[0][0] == 1):
            old, new = atoms.pop(0)
            if old == 1 or need % old == 0:
                got.append((old, new))
                need //= old
                continue
            if old % need:
                raise Unsupported(f"view {old_in} -> {old_out} cuts a dim across pieces")
            # split the atom: the outer piece `need` carries the change (a rank-major stack
            # or a contiguous chunk stays one on its outer index), the inner piece is whole
            if (need * new) % old:
                raise Unsupported(f"view {old_in} -> {old_out} splits a chunked dim unevenly")
            got.append((need, need * new // old))
            atoms.insert(0, (old // need, old // need))
            need = 1
        if need != 1:
            raise Unsupported(f"view {old_in} -> {old_out} has no exact split")
        dealt.append(got)
    if atoms:  # trailing size-1 atoms (a stacked batch of one) stay with the last output dim
        if any(old != 1 for old, _ in atoms):
            raise Unsupported(f"view {old_in} -> {old_out} has no exact split")
        dealt[-1].extend(atoms)
    return dealt


# ------------------------------------------------------------------------ other ops


def out_dims(node: Node, args: tuple, dims_of: Callable[[Node], Dims], old_out: list[int],
             new_out: list[int]) -> Dims:
    """The atoms of a (single-tensor) op's output from its inputs' atoms."""
    target = node.target
    tensors = [a for a in node.args if isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    default = plain_dims(old_out, new_out)
    if target in (aten.permute.default, aten.transpose.int, aten.t.default):
        src = dims_of(node.args[0])
        rank = len(src)
        if target is aten.permute.default:
            order = [d % rank for d in node.args[1]]
        else:
            d0, d1 = (node.args[1] % rank, node.args[2] % rank) if target is aten.transpose.int else (0, rank - 1)
            order = list(range(rank))
            order[d0], order[d1] = order[d1], order[d0]
        return _checked([src[d] for d in order], old_out, new_out, node)
    if target is aten.unsqueeze.default:
        src = list(dims_of(node.args[0]))
        src.insert(node.args[1] % (len(src) + 1), [])
        return _checked(src, old_out, new_out, node)
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        src = dims_of(node.args[0])
        old_in = list(node.args[0].meta["val"].shape)
        drop = set(range(len(src))) if target is aten.squeeze.default else {
            d % len(src) for d in ([node.args[1]] if target is aten.squeeze.dim else node.args[1])}
        return _checked([a for k, a in enumerate(src) if not (k in drop and old_in[k] == 1)], old_out, new_out, node)
    if target in (aten.mm.default, aten.bmm.default, aten.addmm.default):
        a, b = (node.args[1], node.args[2]) if target is aten.addmm.default else (node.args[0], node.args[1])
        da, db = dims_of(a), dims_of(b)
        if target is aten.bmm.default and canonical(da[0]) != canonical(db[0]) and old_out[0] != 1:
            raise Unsupported(f"{node.name}: bmm batches laid out differently ({da[0]} vs {db[0]})")
        return _checked([*da[:-1], db[-1]], old_out, new_out, node)
    composite = [t for t in tensors if any(len(d) > 1 for d in dims_of(t))]
    if not composite:
        return default
    out = [list(d) for d in default]
    for k in range(len(old_out)):
        found: list[list[Atom]] = []
        for t in tensors:
            dims = dims_of(t)
            lead = len(old_out) - len(dims)
            if lead < 0 or (lead > 0 and t in composite and not _broadcasts(target)):
                raise Unsupported(f"{node.name}: {target} changes the rank of merged dims")
            if k < lead:
                continue
            atoms = dims[k - lead]
            if (old_size(atoms), new_size(atoms)) == (old_out[k], new_out[k]) and old_out[k] != 1:
                found.append(atoms)  # the same sizes: the same dim, unless the op reshuffles
        if any(len(a) > 1 for a in found):
            if any(a != found[0] for a in found):
                raise Unsupported(f"{node.name}: its inputs lay out dim {k} differently ({found})")
            out[k] = found[0]
    return _checked(out, old_out, new_out, node)


def _broadcasts(target) -> bool:
    return target is aten.expand.default or getattr(target, "overloadpacket", None) in BROADCASTING


# elementwise ops whose tensor arguments broadcast against each other from the right
BROADCASTING = frozenset(getattr(aten, name) for name in (
    "add", "sub", "mul", "div", "where", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
    "masked_fill", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
) if hasattr(aten, name))


def _checked(dims: Dims, old_out: list[int], new_out: list[int], node: Node) -> Dims:
    dims = [canonical(d) for d in dims]
    if [old_size(d) for d in dims] != list(old_out) or [new_size(d) for d in dims] != list(new_out):
        raise Unsupported(f"{node.name}: its dims do not follow its inputs' ({dims} for {old_out} -> {new_out})")
    return dims
