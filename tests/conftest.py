import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

import os
import sys

# tests/reference holds independent float64 brute-force references: import as `reference.<module>`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
