import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny models run faster on one thread, and CI has two cores to share with the browser and gloo tests.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts single-threaded (a test or a library may change it: it is put back after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
