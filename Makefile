# The README's two commands. Both set up what is missing first (scripts/setup.sh, idempotent).
VENV ?= .venv
MAIN_ARGS ?= fashion-mnist --backbone ViT-B-32:auto

.PHONY: setup run test test-fast lint docs
setup:
	@bash scripts/setup.sh

# The main job: generate, cache, adapt and score on Fashion-MNIST.
run: setup
	$(VENV)/bin/textadapt run $(MAIN_ARGS)

# The test suite (what CI runs).
test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The everyday loop: every test but those marked slow (real servers, the whole CLI flow, > ~5 s).
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff's checks and formatting ([tool.ruff] in pyproject.toml); CI runs it before the tests. `ruff format .` fixes the latter.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrite the pages of docs/ that restate code (tests/test_docs.py fails while one is out of date).
docs: setup
	$(VENV)/bin/python scripts/make_docs.py

# The benchmarks (benchmarks/README.md): each script prints a table and writes benchmarks/results/NAME.json;
# report.py then regenerates benchmarks/RESULTS.md. About 20 minutes on 2 cores.
BENCHMARKS ?= generation_overhead reference_sequential cache encoders training_scale end_to_end intervals cache_readers
.PHONY: bench
bench: setup
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(VENV)/bin/python benchmarks/$$b.py $(BENCH_ARGS) || exit 1; done
	$(VENV)/bin/python benchmarks/report.py
