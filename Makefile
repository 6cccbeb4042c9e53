# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.mopc-installed

.PHONY: demo test test-world8 test-large install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: an unpinned install pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# mop vs FSDP2 vs DDP on 4 CPU ranks (gloo), `small` model: memory per rank by category,
# loss, comm bytes and step time in one table; mop's per-pass graph dumps in mopc_dumps/.
# The baselines run eagerly here to keep the demo short; the benchmark compiles them.
# 5-7 minutes on 2 cores (mop's first step compiles; gloo moves ~1 GB per rank
# per step); `make demo DEMO_MODEL=tiny` takes 2-3.
DEMO_MODEL ?= small
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_dense_parallel.py --model $(DEMO_MODEL) --nproc 4 \
		--steps 3 --batch 4 --seq-len 32 --no-compile-baselines --dump-dir mopc_dumps \
		--out bench_out/dense_parallel_demo.json

# 8-rank runs and the larger property search are left out of `make test` (CI budget);
# `make test-world8` and `make test-large` run them.
# Two pytest-xdist workers: multi-process tests are scheduled first (tests/conftest.py).
PYTEST_ARGS ?= -n 2 -m "not world8 and not large" --durations=25
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-world8: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -m world8

test-large: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -m large

clean:
	rm -rf $(VENV) mopc_dumps .pytest_cache
