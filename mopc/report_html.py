"""The plan report as one self-contained HTML page (`mopc explain --html PATH`).

Inline CSS and JavaScript, no network, no external fonts: the page works offline, from a
`file://` address. Sections: a summary, the per-layer table, the parameters, the
collectives, memory (measured categories and the timeline as an inline SVG chart), and
one section per pass with its graph and a unified diff against the graph before it
(computed here with `difflib`). A search box filters every table row and graph or diff
line to the ones containing the text (case-insensitive), highlights it and counts the
matches. Every piece of text from the report goes through `html.escape`.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Iterable, Sequence

from mopc.passes.analysis.memory_timeline import MemoryTimeline
from mopc.report import (
    COLLECTIVE_HEADER,
    COMPONENT_HEADER,
    LAYER_COMM_HEADER,
    MEMORY_KEYS,
    OFFLOAD_HEADER,
    PassRecord,
    PlanReport,
    collective_cells,
    component_cells,
    diff_summary,
    human_bytes,
    layer_comm_cells,
    offload_cells,
    offload_note,
    offloaded_tensors,
)

__all__ = ["pass_diff", "render_html"]

_DIFF_OPEN_LINES = 300
"""Diffs up to this many lines start expanded; longer ones (and all graphs) start folded."""

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header.bar{position:sticky;top:0;z-index:2;background:#20313f;color:#fff;padding:8px 16px;display:flex;gap:16px;
align-items:center;flex-wrap:wrap}
header.bar h1{font-size:16px;margin:0;font-weight:600}
#search{font:inherit;padding:4px 8px;width:360px;border-radius:4px;border:1px solid #889}
#match-count{font-variant-numeric:tabular-nums;min-width:8em}
nav{padding:6px 16px;background:#e8edf1;font-size:13px}nav a{margin-right:12px}
main{padding:0 16px 40px}section{margin:18px 0}h2{font-size:17px;border-bottom:1px solid #ccd;padding-bottom:3px}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;font-size:12.5px;background:#fff}
th,td{border:1px solid #d5d9de;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eef1f4;position:sticky;top:48px}td.n{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600}
.code{font:12px/1.35 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;overflow-x:auto;
background:#fff;border:1px solid #d5d9de;padding:4px 0;max-height:70vh;overflow-y:auto}
.ln{padding:0 8px;min-height:1.35em;white-space:pre}
.add{background:#e6ffec;color:#055d20}.del{background:#ffebe9;color:#82071e}
.hunk{color:#6639ba;background:#f6f0ff}.fh{color:#57606a;font-weight:600}
summary{cursor:pointer;margin:4px 0}.cnt{color:#9a6700;font-weight:600;margin-left:6px}
mark{background:#ffd33d;color:inherit;padding:0}
body.searching .s:not(.hit){display:none}body.searching .nohit{display:none}
.muted{color:#57606a}.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -2px 12px}
"""

_JS = """
(function () {
  "use strict";
  var input = document.getElementById("search");
  var countEl = document.getElementById("match-count");
  var items = Array.prototype.slice.call(document.querySelectorAll(".s"));
  var texts = items.map(function (e) { return e.textContent; });
  var lower = texts.map(function (t) { return t.toLowerCase(); });
  var isLine = items.map(function (e) { return e.classList.contains("ln"); });
  var details = Array.prototype.slice.call(document.querySelectorAll("details"));
  var groups = Array.prototype.slice.call(document.querySelectorAll(".sg"));
  var wasOpen = details.map(function (d) { return d.open; });
  var marked = [];
  var searching = false;
  var MAX_MARKED = 20000;

  function unmark() {
    for (var k = 0; k < marked.length; k++) { items[marked[k]].textContent = texts[marked[k]]; }
    marked = [];
  }
  function mark(i, q) {
    var t = texts[i], tl = lower[i], frag = document.createDocumentFragment(), pos = 0, at;
    while ((at = tl.indexOf(q, pos)) !== -1) {
      if (at > pos) { frag.appendChild(document.createTextNode(t.slice(pos, at))); }
      var m = document.createElement("mark");
      m.textContent = t.slice(at, at + q.length);
      frag.appendChild(m);
      pos = at + q.length;
    }
    if (pos < t.length) { frag.appendChild(document.createTextNode(t.slice(pos))); }
    items[i].textContent = "";
    items[i].appendChild(frag);
    marked.push(i);
  }
  function apply() {
    var q = input.value.trim().toLowerCase();
    unmark();
    if (q && !searching) { wasOpen = details.map(function (d) { return d.open; }); }
    searching = q.length > 0;
    document.body.classList.toggle("searching", searching);
    var n = 0;
    for (var i = 0; i < items.length; i++) {
      var hit = searching && lower[i].indexOf(q) !== -1;
      items[i].classList.toggle("hit", hit);
      if (hit) {
        n++;
        if (isLine[i] && marked.length < MAX_MARKED) { mark(i, q); }
      }
    }
    groups.forEach(function (g) {
      var c = searching ? g.querySelectorAll(".s.hit").length : 0;
      var badge = g.querySelector(".cnt");
      if (badge) { badge.textContent = searching ? "(" + c + ")" : ""; }
      g.classList.toggle("nohit", searching && c === 0);
    });
    details.forEach(function (d, k) {
      d.open = searching ? d.querySelector(".s.hit") !== null : wasOpen[k];
    });
    countEl.textContent = searching ? n + (n === 1 ? " match" : " matches") : "";
    countEl.setAttribute("data-count", String(n));
    countEl.setAttribute("data-query", q);
  }
  var timer = null;
  input.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(apply, 120);
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Escape") { input.value = ""; apply(); }
  });
  document.body.setAttribute("data-ready", "1");
})();
"""

_COLORS = (("params", "parameter shards + inputs", "#8fb8de"), ("saved", "saved activations", "#f2a65a"),
           ("temporaries", "temporaries", "#c5d86d"), ("grads", "gradient shards", "#b084cc"))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cells(row: Sequence[str], numeric: Sequence[int]) -> str:
    return "".join(f"<td class=\"n\">{esc(c)}</td>" if i in numeric else f"<td>{esc(c)}</td>"
                   for i, c in enumerate(row))


def _table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (),
           footer: Sequence[str] | None = None) -> str:
    """A searchable table: every body row is a search item."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f"<tr class=\"s\">{_cells(row, numeric)}</tr>\n" for row in rows)
    foot = f"<tfoot><tr>{_cells(footer, numeric)}</tr></tfoot>" if footer is not None else ""
    return (f"<div class=\"sg\"><span class=\"cnt\"></span><table id=\"{esc(table_id)}\"><thead><tr>{head}</tr>"
            f"</thead><tbody>\n{body}</tbody>{foot}</table></div>")


def _lines(lines: Sequence[str], classes: Sequence[str] = ()) -> str:
    """Code lines, each a search item (with an extra class: diff colours)."""
    out = []
    for i, line in enumerate(lines):
        extra = f" {classes[i]}" if i < len(classes) and classes[i] else ""
        out.append(f"<div class=\"ln s{extra}\">{esc(line)}</div>")
    return "<div class=\"code\">" + "".join(out) + "</div>"


def pass_diff(before: PassRecord, after: PassRecord) -> list[str]:
    """Unified diff of two graphs' dump texts (2 lines of context)."""
    return list(difflib.unified_diff(before.text.splitlines(), after.text.splitlines(), fromfile=before.name,
                                     tofile=after.name, n=2, lineterm=""))


def _diff_class(line: str) -> str:
    if line.startswith(("+++", "---")):
        return "fh"
    if line.startswith("@@"):
        return "hunk"
    if line.startswith("+"):
        return "add"
    if line.startswith("-"):
        return "del"
    return ""


def _pass_sections(report: PlanReport) -> str:
    out = []
    for graph in report.graphs:
        previous = None
        for index, record in enumerate(graph.passes):
            anchor = f"pass-{graph.graph_id}-{index:02d}-{record.name}"
            nodes = sum(1 for line in record.text.splitlines() if line.startswith("%"))
            title = f"graph {graph.graph_id}, {index:02d} {record.name} ({record.kind}, {record.seconds * 1e3:.1f} ms)"
            parts = [(f"<section class=\"pass sg\" id=\"{esc(anchor)}\">"
                      f"<h3>{esc(title)}<span class=\"cnt\"></span></h3>"
                      f"<p class=\"muted\">op-count diff: {esc(diff_summary(record.op_count_diff))}"
                      f"{esc('; ' + record.note) if record.note else ''}</p>")]
            if record.kind == "partition":
                parts.append("<p class=\"muted\">a partition of the joint graph, not a rewrite of it: no diff</p>")
            elif previous is not None:
                diff = pass_diff(previous, record)
                added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
                removed = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
                if diff:
                    is_open = " open" if len(diff) <= _DIFF_OPEN_LINES else ""
                    parts.append(f"<details class=\"diff\"{is_open}><summary>diff against {esc(previous.name)}: "
                                 f"+{added} -{removed} lines</summary>"
                                 f"{_lines(diff, [_diff_class(d) for d in diff])}</details>")
                else:
                    parts.append(f"<p class=\"muted\">graph text unchanged from {esc(previous.name)}</p>")
            parts.append(f"<details class=\"graph\"><summary>graph after {esc(record.name)} ({nodes} nodes)</summary>"
                         f"{_lines(record.text.splitlines())}</details></section>")
            out.append("".join(parts))
            if record.kind != "partition":
                previous = record
    return "\n".join(out)


def _svg_timeline(timeline: MemoryTimeline, width: int = 960, height: int = 280, max_points: int = 600) -> str:
    """A stacked area chart of the timeline's categories, node by node (downsampled to the
    largest total per bucket of nodes)."""
    points = list(timeline.points)
    if not points:
        return ""
    step = max(1, -(-len(points) // max_points))
    picked = []
    for start in range(0, len(points), step):
        i = max(range(start, min(start + step, len(points))), key=lambda k: points[k].total)
        picked.append((i, points[i]))
    peak = max(p.total for _, p in picked) or 1
    left, top, plot_w, plot_h = 70, 10, width - 90, height - 50
    x = lambda i: left + plot_w * i / max(1, len(points) - 1)
    y = lambda b: top + plot_h * (1 - b / peak)
    shapes = []
    base = [0] * len(picked)
    for key, label, color in _COLORS:
        tops = [b + getattr(p, key) for b, (_, p) in zip(base, picked, strict=True)]
        upper = " ".join(f"{x(i):.1f},{y(t):.1f}" for (i, _), t in zip(picked, tops, strict=True))
        lower = " ".join(f"{x(i):.1f},{y(b):.1f}" for (i, _), b in reversed(list(zip(picked, base, strict=True))))
        shapes.append(f"<polygon points=\"{upper} {lower}\" fill=\"{color}\" stroke=\"none\">"
                      f"<title>{esc(label)}</title></polygon>")
        base = tops
    boundary = x(timeline.num_forward - 0.5)
    ticks = "".join(f"<line x1=\"{left}\" x2=\"{left + plot_w}\" y1=\"{y(peak * f):.1f}\" y2=\"{y(peak * f):.1f}\" "
                    f"stroke=\"#ccd\" stroke-width=\"0.5\"/><text x=\"{left - 6}\" y=\"{y(peak * f) + 4:.1f}\" "
                    f"text-anchor=\"end\" font-size=\"11\">{esc(human_bytes(peak * f))}</text>"
                    for f in (0, 0.25, 0.5, 0.75, 1))
    p = timeline.peak
    peak_index = points.index(p)
    legend = "".join(f"<span style=\"background:{c}\"></span>{esc(label)}" for _, label, c in _COLORS)
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"timeline-{esc(timeline.graph)}\" width=\"{width}\" "
            f"height=\"{height}\" role=\"img\" aria-label=\"memory timeline\">{ticks}{''.join(shapes)}"
            f"<line x1=\"{boundary:.1f}\" x2=\"{boundary:.1f}\" y1=\"{top}\" y2=\"{top + plot_h}\" stroke=\"#333\" "
            f"stroke-dasharray=\"4 3\"/><text x=\"{boundary - 4:.1f}\" y=\"{top + plot_h + 16}\" text-anchor=\"end\" "
            f"font-size=\"11\">forward</text><text x=\"{boundary + 4:.1f}\" y=\"{top + plot_h + 16}\" "
            f"font-size=\"11\">backward</text><circle cx=\"{x(peak_index):.1f}\" cy=\"{y(p.total):.1f}\" r=\"3\" "
            f"fill=\"#c00\"><title>{esc(f'peak {human_bytes(p.total)} after {p.phase} node {p.node}')}</title>"
            f"</circle><text x=\"{left}\" y=\"{top + plot_h + 34}\" font-size=\"11\">nodes of the forward, then the "
            f"backward graph ({len(points)})</text></svg><div class=\"legend\">{legend}</div>")


def _memory_section(report: PlanReport) -> str:
    rows = [(label, human_bytes(report.memory.get(key, 0)), f"{report.memory.get(key, 0):,}")
            for key, label in MEMORY_KEYS]
    parts = ["<p>Measured on this rank's step: live storages by category (<code>mopc/runtime/memory.py</code>).</p>",
             _table("memory-table", ("category", "size", "bytes"), rows, numeric=(1, 2))]
    for graph in report.graphs:
        t = graph.timeline
        if t is None:
            parts.append(f"<p>graph {esc(graph.graph_id)}: no timeline (no partitioned forward/backward graphs "
                         "were recorded)</p>")
            continue
        p = t.peak
        parts.append(f"<h3>Memory timeline of graph {esc(graph.graph_id)}</h3><p>An estimate from the partitioned "
                     "graphs: each node's output bytes, alive until its last use; views and waits share their "
                     "input's storage; allocator caching is not modelled. Peak "
                     f"<b>{esc(human_bytes(p.total))}</b> after {esc(p.phase)} node <code>{esc(p.node)}</code> "
                     f"(parameter shards and inputs {esc(human_bytes(p.params))}, saved activations "
                     f"{esc(human_bytes(p.saved))}, temporaries {esc(human_bytes(p.temporaries))}, gradient "
                     f"shards {esc(human_bytes(p.grads))}).</p>")
        if t.unknown_sizes:
            parts.append(f"<p class=\"muted\">{t.unknown_sizes} tensors have sizes known only at run time (expert "
                         "dispatch rows) and count as 0.</p>")
        parts.append(_svg_timeline(t))
    return "".join(parts)


def render_html(report: PlanReport) -> str:
    """The whole page, as a string."""
    collectives = report.collectives
    sent = sum(c.bytes_sent for c in collectives)
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(report.options.items())) or "defaults"
    timelines = [g.timeline for g in report.graphs if g.timeline is not None]
    summary = [
        ("model", report.model),
        ("world", f"{report.world_size} ranks; this page shows rank {report.rank} (a fake process group)"),
        ("mesh", report.mesh.splitlines()[0].removeprefix("mesh: ") if report.mesh else ""),
        ("options", opts),
        ("batch per rank", f"[{report.batch}, {report.seq_len}]"),
        ("parameter bytes on this rank", f"{sum(r.bytes_per_rank for r in report.components):,}"),
        ("collectives", (f"{len(collectives)} ({sum(c.phase == 'forward' for c in collectives)} forward, "
                        f"{sum(c.phase == 'backward' for c in collectives)} backward); {sent:,} bytes sent by this "
                        "rank per step")),
        ("memory peak (measured)", human_bytes(report.memory.get("peak", 0))),
        ("memory peak (timeline estimate)", ", ".join(human_bytes(t.peak.total) for t in timelines) or "n/a"),
        ("offload", offload_note(report).split(": ", 1)[1]),
        ("graphs", ", ".join(f"{g.graph_id}: {len(g.passes)} steps" for g in report.graphs)),
        ("built in", f"{report.seconds:.1f} s"),
    ]
    summary_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)
    comp = report.components
    comp_footer = ["total", "", "", str(sum(r.num_tensors for r in comp)), f"{sum(r.numel for r in comp):,}",
                   f"{sum(r.full_bytes for r in comp):,}", f"{sum(r.bytes_per_rank for r in comp):,}",
                   f"{sum(r.gathered_bytes_per_rank for r in comp):,}"]
    comm = report.layer_comm
    comm_footer = ["total", str(sum(r.num_forward for r in comm)), str(sum(r.num_backward for r in comm)),
                   f"{sum(r.sent_forward for r in comm):,}", f"{sum(r.sent_backward for r in comm):,}", ""]
    coll_header = ("graph", *COLLECTIVE_HEADER)
    coll_rows = [(c.graph, *collective_cells(c)) for c in collectives]
    params = [(p.fqn, p.role, p.layer, "x".join(map(str, p.shape)), p.layout, f"{p.bytes_per_rank:,}")
              for p in report.params]
    title = f"mopc plan report: {report.model}, world {report.world_size}" + (f" ({opts})" if report.options else "")
    nav = "".join(f"<a href=\"#{a}\">{esc(t)}</a>" for a, t in (
        ("summary", "summary"), ("layers", "layers"), ("params", "parameters"), ("collectives", "collectives"),
        ("memory", "memory"), ("offload", "offload"), ("passes", "passes")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<header class="bar"><h1>{esc(title)}</h1>
<input id="search" type="search" placeholder="filter nodes, ops, layers, roles (e.g. all_gather)" autocomplete="off"
 aria-label="search"><span id="match-count" data-count="0"></span></header>
<nav>{nav}</nav>
<main>
<section id="summary"><h2>Summary</h2><table id="summary-table">{summary_rows}</table>
<pre class="muted">{esc(report.mesh)}</pre></section>
<section id="layers"><h2>Per layer and component</h2>
<p class="muted">Bytes of this rank: its shards at rest, and what it gathers of them in a step (the
vocabulary shard is used in place).</p>
{_table("layer-table", COMPONENT_HEADER, [component_cells(r) for r in comp], (3, 4, 5, 6, 7), comp_footer)}
<h3>Collectives per layer</h3>
<p class="muted">By the layer of their node; embedding, vocabulary-projection and loss collectives outside the
layers. Sent: bytes this rank sends per step.</p>
{_table("layer-comm-table", LAYER_COMM_HEADER, [layer_comm_cells(r) for r in comm], (1, 2, 3, 4), comm_footer)}
</section>
<section id="params"><h2>Parameters</h2>
<details><summary>{len(params)} parameters with role, layout and bytes on this rank</summary>
{_table("param-table", ("parameter", "role", "layer", "shape", "layout", "bytes/rank"), params, (5,))}</details>
</section>
<section id="collectives"><h2>Collectives</h2>
<p class="muted">Every collective of the partitioned forward and backward graphs. In/out: the tensors on this rank;
sent: bytes this rank sends under ring/pairwise algorithms (mopc/runtime/comm.py).</p>
{_table("collective-table", coll_header, coll_rows, (4, 5, 6, 7))}
</section>
<section id="memory"><h2>Memory</h2>{_memory_section(report)}</section>
<section id="offload"><h2>Offload</h2><p>{esc(offload_note(report))}</p>{_offload_table(report)}</section>
<section id="passes"><h2>Passes</h2>
<p class="muted">Each pass's graph as the dumps print it (one line per node: value, op, role, layer, and the pass
that created it), with a unified diff against the graph before it.</p>
{_pass_sections(report)}
</section>
<section id="notes"><h2>Notes</h2><ul>{"".join(f"<li>{esc(n)}</li>" for n in report.notes)}</ul></section>
</main>
<script>{_JS}</script>
</body></html>
"""


def _offload_table(report: PlanReport) -> str:
    rows = [offload_cells(r) for r in offloaded_tensors(report)]
    return _table("offload-table", OFFLOAD_HEADER, rows, (3,)) if rows else ""
