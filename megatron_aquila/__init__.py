"""Megatron-style 3D-parallel pretraining and fine-tuning for the Aquila2 model family."""
import torch

MIN_TORCH = (2, 10)  # the oldest torch admitted (setup.py); CI runs 2.13, docs/gpu.md section 1 says what ran where


def _torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``2.13.0+cpu`` or ``2.10.0a0+b4e4ee8``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


if _torch_release(torch.__version__) < MIN_TORCH:
    raise ImportError(f"megatron_aquila needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}: "
                      "install a newer torch (pip install 'torch>=2.10', or the NGC PyTorch 25.12 image of the "
                      "Dockerfile)")
