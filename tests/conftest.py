import sys
from pathlib import Path

import pytest
import torch

# Tests import helpers such as tests/distributed.py by module name, also in spawned workers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` (tools/gpu_check.sh runs them) skip with reason "needs CUDA" on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(needs_cuda)
