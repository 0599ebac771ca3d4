"""Tests marked ``cuda`` need a CUDA GPU: they are skipped without one (benchmarks/gpu_check.py runs them)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (python benchmarks/gpu_check.py runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
