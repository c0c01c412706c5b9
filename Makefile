# Fresh machine: `make run` sets up and serves a model; `make test` runs the test suite.
PYTHON ?= python3
TINY_CHECKPOINT ?= .cache/tiny-vila
PORT ?= 21002

.PHONY: setup run test lint

# torch first, and only if absent: an existing (CUDA) build is kept; on a bare machine the
# pinned CPU wheel is taken, so that nothing pulls a multi-GB CUDA build as a dependency.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

# Until the embedded demo model lands, this serves a tiny *random* VILA checkpoint built
# locally: the whole protocol works, the answers are gibberish.
run: setup
	$(PYTHON) tests/integration/tiny_vila.py $(TINY_CHECKPOINT)
	$(PYTHON) -m vilaserve.entrypoints.model_worker --model-path $(TINY_CHECKPOINT) \
		--port $(PORT) --no-register --log-format text

test: setup
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check src tests
