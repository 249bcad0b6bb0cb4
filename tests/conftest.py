"""Shared test fixtures: where the reference data lives, and a quiet, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (../shared/reference beside the repo)")
    return REFERENCE_DIR


TEST_THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)


@pytest.fixture(autouse=True)
def _torch_threads():
    # `OMP_NUM_THREADS=1 make test` must really run single-threaded: float results differ in the last bits between
    # thread counts, and the suite has to pass with either (README, "Tests").
    torch.set_num_threads(TEST_THREADS)
    yield
