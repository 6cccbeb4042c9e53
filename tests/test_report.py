"""The plan report (`mopc explain --nproc N --html PATH`): its content, its page, and the page in a browser.

One report of `tiny` at world 2 with tp=2 and ep=2 (every distributed pass inserts
collectives) is built once per test session, on a fake process group, and shared by
every test (also across pytest-xdist workers, through a file lock).
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import math
import os
import pickle
import re
import shutil
import tempfile
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch.distributed as dist

from mopc.report import OFFLOAD_NOTE, PassRecord, PlanReport, build_report
from mopc.report_html import render_html

WORLD, PER_RANK, SEQ = 2, 2, 16
OPTIONS = {"tp": 2, "ep": 2}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> PlanReport:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_report("tiny", WORLD, OPTIONS, batch=PER_RANK, seq_len=SEQ)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, above every worker's own
    cached = shared / "mopc_plan_report.pkl"
    with FileLock(str(shared / "mopc_plan_report.lock")):
        if cached.exists():
            return pickle.loads(cached.read_bytes())
        built = build_report("tiny", WORLD, OPTIONS, batch=PER_RANK, seq_len=SEQ)
        cached.write_bytes(pickle.dumps(built))
        return built


@pytest.fixture(scope="module")
def page(report, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "plan.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path


def _final_graphs(report: PlanReport) -> dict[str, str]:
    (graph,) = report.graphs  # tiny compiles as one Dynamo graph
    return {p.name: p.text for p in graph.passes if p.kind == "partition"}


# ---------------------------------------------------------------------------- content

_COLLECTIVE_OPS = {
    "all_gather": r"= _c10d_functional\.all_gather_into_tensor\(",
    "reduce_scatter": r"= _c10d_functional\.reduce_scatter_tensor\(",
    "all_reduce": r"= _c10d_functional\.all_reduce\(",
    "all_to_all": r"= mopc\.ep_(?:dispatch|combine)\(",
}


def test_collectives_are_those_of_the_final_forward_and_backward_graphs(report):
    for phase, text in _final_graphs(report).items():
        listed = [c for c in report.collectives if c.phase == phase]
        for kind, pattern in _COLLECTIVE_OPS.items():
            in_graph = [re.match(r"%(\w+):", line).group(1) for line in text.splitlines() if re.search(pattern, line)]
            assert sorted(c.collective.node for c in listed if c.collective.kind == kind) == sorted(in_graph), \
                (phase, kind)
        assert listed, phase
    text = report.text()
    assert all(c.collective.node in text for c in report.collectives)


def test_collective_bytes_match_the_layout(report):
    token_bytes = PER_RANK * SEQ * 64 * 4  # this rank's hidden states, f32
    for row in report.collectives:
        c = row.collective
        if c.kind == "all_gather":
            assert c.bytes_out == c.group_size * c.bytes_in and row.bytes_sent == c.bytes_in * (c.group_size - 1)
        elif c.kind == "reduce_scatter":
            assert c.bytes_in == c.group_size * c.bytes_out and row.bytes_sent == c.bytes_in * (c.group_size - 1) // 2
        assert row.axis != "?", c
    forward = [r.collective for r in report.collectives if r.phase == "forward"]
    tp = [c for c in forward if c.created_by == "tensor_parallel"]
    # 3 attention blocks + 1 dense MLP: gather the tp group's tokens, reduce-scatter the partial output
    assert [c.kind for c in tp] == ["all_gather", "reduce_scatter"] * 4
    assert {(c.bytes_in, c.bytes_out) for c in tp if c.kind == "all_gather"} == {(token_bytes, 2 * token_bytes)}
    ep = [c for c in forward if c.created_by == "expert_parallel"]
    assert [c.kind for c in ep] == ["all_gather", "all_to_all", "all_to_all"] * 2  # per MoE layer
    assert {c.bytes_in for c in ep if c.kind == "all_to_all"} == {token_bytes * 2}  # top-2 rows per token
    totals = report.layer_comm
    assert sum(r.num_forward + r.num_backward for r in totals) == len(report.collectives)
    assert sum(r.sent_forward + r.sent_backward for r in totals) == sum(r.bytes_sent for r in report.collectives)


def test_per_layer_components_have_their_layout_and_bytes_per_rank(report):
    from mopc.models import build_model

    model = build_model("tiny", device="meta")
    # world 2: every layout (flat, tp chunks over dp=1, ep over edp=1, vocab rows) leaves half per rank
    expected = {fqn: math.ceil(p.numel() / WORLD) * p.element_size() for fqn, p in model.named_parameters()}
    assert {p.fqn: p.bytes_per_rank for p in report.params} == expected
    assert sum(r.bytes_per_rank for r in report.components) == report.memory["params"]  # measured shards
    rows = {(r.layer, r.role): r for r in report.components}
    assert rows[("layer 0", "attention")].layout.startswith("tp:")
    assert rows[("layer 0", "dense_mlp")].layout.startswith("tp:")
    assert rows[("layer 1", "expert")].layout.startswith("ep: 4 of 8 experts")
    assert rows[("layer 1", "router")].layout.startswith("flat:")
    assert rows[("head", "vocab_projection")].layout.startswith("vocab:")
    assert rows[("head", "vocab_projection")].gathered_bytes_per_rank == 0
    assert rows[("embedding", "embedding")].gathered_bytes_per_rank == 128 * 64 * 4
    assert {role for _, role in rows} >= {"attention", "dense_mlp", "router", "expert", "shared_expert",
                                          "embedding", "norm", "vocab_projection"}


def test_memory_timeline_agrees_with_the_measured_step(report):
    from mopc.models import build_model

    (graph,) = report.graphs
    points = graph.timeline.points
    inputs = 2 * PER_RANK * SEQ * 8  # input_ids and labels, int64
    buffers = sum(b.numel() * b.element_size() for b in build_model("tiny", device="meta").buffers())
    assert points[0].params == report.memory["params"] + inputs + buffers
    assert points[-1].grads == report.memory["grads"]  # every gradient shard, as measured
    assert points[-1].saved == 0 and points[-1].temporaries == 0  # everything else freed
    end_of_forward = points[graph.timeline.num_forward - 1]
    # saved activations: the measured ones, less the expert rows whose size the graph does not know
    assert 0 < end_of_forward.saved <= report.memory["activations_peak"]
    assert graph.timeline.unknown_sizes > 0


def test_text_report_sections(report):
    text = report.text(params=True)
    for needle in ("per layer and component", "collectives per layer", "collectives of graph g", OFFLOAD_NOTE,
                   "memory of this rank's step", "memory timeline of graph", "passes (graph, pass, kind",
                   "layers.1.moe.experts.w1"):
        assert needle in text
    passes = [p.name for p in report.graphs[0].passes]
    assert passes[0] == "captured" and passes[-2:] == ["forward", "backward"]
    assert {"tensor_parallel", "expert_parallel", "vocab_parallel_loss", "gather_params"} <= set(passes)


def test_explain_flags_and_errors(capsys):
    from mopc.cli import build_parser, main, mop_options

    args = build_parser().parse_args(["explain", "--nproc", "4", "--tp", "2", "--ep", "4", "--bucket-mb", "1",
                                      "--html", "x.html"])
    assert (args.nproc, args.html, args.rank) == (4, "x.html", 0)
    assert mop_options(args) == {"tp": 2, "ep": 4, "bucket_mb": 1.0}
    with pytest.raises(SystemExit, match="--tp, --ep describe.* add --nproc N"):
        main(["explain", "--tp", "2", "--ep", "2"])
    with pytest.raises(SystemExit, match="tp=2 does not divide the world size 3"):
        main(["explain", "--nproc", "3", "--tp", "2", "--dump-dir", ""])
    with pytest.raises(SystemExit, match="takes tiny or small"):
        main(["explain", "--model", "deepseek-v3", "--nproc", "2", "--dump-dir", ""])
    assert not dist.is_initialized()  # the fake group it made is gone


# ---------------------------------------------------------------------------- the page


class _Items(HTMLParser):
    """Tag ids and the text of every search item (class `s`), as the browser's textContent."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.items: list[tuple[str, str]] = []  # (classes, text)
        self.refs: list[str] = []
        self._depth = 0
        self._text: list[str] = []
        self._classes = ""
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self.refs += [attrs[k] for k in ("src", "href") if k in attrs]
        self._in_title = tag == "title"
        if self._depth:
            self._depth += 1
        elif "s" in (attrs.get("class") or "").split():
            self._depth, self._text, self._classes = 1, [], attrs["class"]

    def handle_endtag(self, tag):
        self._in_title = False
        if self._depth:
            self._depth -= 1
            if not self._depth:
                self.items.append((self._classes, "".join(self._text)))

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._depth:
            self._text.append(data)


def _parse(path: Path) -> _Items:
    parser = _Items()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_page_is_self_contained_and_has_every_section(report, page):
    html_text = page.read_text(encoding="utf-8")
    assert page.stat().st_size < 5_000_000
    parsed = _parse(page)
    assert parsed.title.startswith("mopc plan report: tiny, world 2")
    gid = report.graphs[0].graph_id  # g0 alone; another number after earlier compilations in the process
    assert {"search", "match-count", "summary-table", "layer-table", "layer-comm-table", "collective-table",
            "memory-table", f"timeline-{gid}", "offload"} <= parsed.ids
    assert all(ref.startswith("#") for ref in parsed.refs), "no link or resource outside the page"
    assert not re.search(r"@import|url\(|<link |<script src", html_text)
    passes = report.graphs[0].passes
    assert sum(1 for i in parsed.ids if i.startswith(f"pass-{gid}-")) == len(passes)
    rows = [text for classes, text in parsed.items if classes == "s"]
    assert len(rows) >= len(report.collectives) + len(report.params) + len(report.components)
    # the diff of a rewrite: difflib's lines, coloured by what they do
    tp = next(i for i, p in enumerate(passes) if p.name == "tensor_parallel")
    diff = list(difflib.unified_diff(passes[tp - 1].text.splitlines(), passes[tp].text.splitlines(),
                                     fromfile=passes[tp - 1].name, tofile=passes[tp].name, n=2, lineterm=""))
    lines = {text: classes for classes, text in parsed.items if classes.startswith("ln s ")}
    added = [d for d in diff if d.startswith("+%") and "by=tensor_parallel" in d]
    assert added and all(lines.get(d) == "ln s add" for d in added)
    assert html.escape(OFFLOAD_NOTE) in html_text


def test_page_escapes_graph_text(report):
    (graph,) = report.graphs
    evil = PassRecord(name="evil<pass>", kind="rewrite", seconds=0.0, text="%x: f32[1] = <script>alert(1)</script>\n",
                      op_count_diff={})
    fake = dataclasses.replace(report, graphs=(dataclasses.replace(graph, passes=(*graph.passes[:2], evil)),))
    text = render_html(fake)
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "evil&lt;pass&gt;" in text and text.count("<script>") == 1


# ---------------------------------------------------------------------------- in a browser


def _browser(tmp_path: Path):
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="headless browser test needs selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# checkVisibility: false under display:none and inside a closed <details>
_VISIBLE = """var shown = Array.prototype.filter.call(document.querySelectorAll('.s'),
    function (e) { return e.checkVisibility(); });
return arguments[0] ? shown.map(function (e) { return e.textContent; }) : shown.length;"""


def _search(driver, box, query: str) -> int:
    """Type `query`; the number of matches the page reports once it has filtered for it."""
    from selenium.webdriver.support.ui import WebDriverWait

    box.clear()
    box.send_keys(query)
    count = driver.find_element("id", "match-count")
    WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: count.get_attribute("data-query") == query.lower())
    return int(count.get_attribute("data-count"))


def test_page_renders_and_search_filters_in_a_headless_browser(report, page):
    items = [text for _, text in _parse(page).items]
    profile = Path(tempfile.mkdtemp(prefix="mopc-chromium-"))
    try:
        driver = _browser(profile)  # skips without chromium or selenium
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(page.as_uri())
        assert driver.title.startswith("mopc plan report: tiny, world 2")
        assert driver.find_element("tag name", "body").get_attribute("data-ready") == "1"  # the script ran
        for table in ("summary-table", "layer-table", "collective-table", "memory-table"):
            assert driver.find_element("id", table).is_displayed()
        assert driver.find_element("id", f"timeline-{report.graphs[0].graph_id}").is_displayed()
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        visible_before = driver.execute_script(_VISIBLE, False)

        box = driver.find_element("id", "search")
        n = _search(driver, box, "all_gather")
        expected = sum("all_gather" in t.lower() for t in items)
        assert n == expected > 0
        assert driver.find_element("id", "match-count").text == f"{expected} matches"
        visible = driver.execute_script(_VISIBLE, True)
        assert len(visible) == expected < len(items)  # only the matching lines and rows, and every one shown
        assert all("all_gather" in t.lower() for t in visible)
        assert driver.find_elements("css selector", ".ln mark")  # highlighted

        n = _search(driver, box, "ep_dispatch")
        assert n == sum("ep_dispatch" in t.lower() for t in items) > 0 and n != expected
        assert _search(driver, box, "no_such_node_zz") == 0
        assert driver.execute_script(_VISIBLE, False) == 0

        box.send_keys(Keys.ESCAPE)  # clears the search
        WebDriverWait(driver, 10, poll_frequency=0.05).until(
            lambda d: d.find_element("id", "match-count").get_attribute("data-query") == "")
        assert box.get_attribute("value") == ""
        assert driver.execute_script(_VISIBLE, False) == visible_before  # everything back, folded as before
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_offloaded_tensors_are_listed_from_the_forward_graph():
    from mopc.report import offload_note, offloaded_tensors

    text = ("%grouped_mm: f32[u0, 32] = mopc.grouped_mm(%x, %w, %offs)  # role=expert layer=1\n"
            "%offload_default: f32[u0, 32] = mopc.offload(%grouped_mm)  # role=expert layer=1\n"
            "%offload_default_1: i64[32, 2] = mopc.offload(%getitem_17)  # role=dispatch layer=1")
    graph = types.SimpleNamespace(graph_id="g0", passes=(PassRecord("forward", "partition", 0.0, text, None),))
    report = types.SimpleNamespace(graphs=(graph,), options={"offload": "experts"})
    rows = offloaded_tensors(report)
    assert rows == [("g0", "grouped_mm", "f32[u0, 32]", None, "role=expert layer=1"),
                    ("g0", "getitem_17", "i64[32, 2]", 512, "role=dispatch layer=1")]
    assert offload_note(report).startswith("offload: 2 saved tensors (512 B plus 1 sized at run time) go to host")
    assert offload_note(types.SimpleNamespace(graphs=(), options={})) == OFFLOAD_NOTE
