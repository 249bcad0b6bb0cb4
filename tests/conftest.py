"""Shared test fixtures: where the reference data lives, and a quiet, deterministic torch."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield
