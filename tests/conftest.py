import os
import sys
from pathlib import Path

import torch

# Tiny models run faster on one thread, and CI has two cores to share with the browser and gloo tests.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
