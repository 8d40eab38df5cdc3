import sys
from pathlib import Path

import torch

# Tests import helpers such as tests/distributed.py by module name, also in spawned workers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
