# The README's two commands. Both set up what is missing first (scripts/setup.sh, idempotent).
VENV ?= .venv
MAIN_ARGS ?= fashion-mnist --backbone ViT-B-32:auto

.PHONY: setup run test
setup:
	@bash scripts/setup.sh

# The main job: generate, cache, adapt and score on Fashion-MNIST.
run: setup
	$(VENV)/bin/textadapt run $(MAIN_ARGS)

# The test suite (what CI runs).
test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
