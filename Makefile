# Fresh machine: `make demo` serves the embedded demo model with its web chat; `make test` checks
# the architecture and lint, then runs the test suite; `make run` serves a tiny random checkpoint.
PYTHON ?= python3
TINY_CHECKPOINT ?= .cache/tiny-vila
PORT ?= 21002

DEMO_ARGS ?=
# awq (the issue's W4A16 default), rtn or 16bit (today the most accurate: see the README)
DEMO_VARIANT ?= awq

.PHONY: setup run demo test lint

# torch first, and only if absent: an existing (CUDA) build is kept; on a bare machine the
# pinned CPU wheel is taken, so that nothing pulls a multi-GB CUDA build as a dependency.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,ray]"

# A tiny *random* VILA checkpoint built locally, worker only: the whole protocol works, the
# answers are gibberish (quick protocol checks; `make demo` serves a model that sees).
run: setup
	$(PYTHON) -m vilaserve.entrypoints.cli build-tiny $(TINY_CHECKPOINT)
	$(PYTHON) -m vilaserve.entrypoints.worker --model-path $(TINY_CHECKPOINT) \
		--port $(PORT) --no-register --log-format text

# The embedded demo model (SmolLM2-135M + our SigLIP tower) in W4A16 AWQ, with the whole stack:
# built on the first run (fetch SmolLM2, assemble, apply the shipped AWQ search result; a fresh
# clone reaches the chat URL in 67.5 s on a 2-core EPYC, setup included; cached in ~/.cache/vilaserve),
# then `vilaserve serve` prints the chat URL. DEMO_ARGS go to serve (e.g. --api-port 8080).
demo: setup
	@model="$$($(PYTHON) -m vilaserve.entrypoints.cli build-demo --variant $(DEMO_VARIANT))" && \
	precision="$$(if [ "$(DEMO_VARIANT)" = 16bit ]; then echo W16A16; else echo W4A16; fi)" && \
	exec $(PYTHON) -m vilaserve.entrypoints.cli serve --model-path "$$model" --precision "$$precision" \
		--log-format text $(DEMO_ARGS)

# The README's test command (and so CI's): the layer contracts, lint, formatting, then pytest.
test: setup lint
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
