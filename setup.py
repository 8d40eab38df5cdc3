"""Build and install megatron_aquila with its pybind11 C++ index helpers."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

helpers_extension = Pybind11Extension(
    "megatron_aquila.data._helpers",
    ["csrc/helpers.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megatron_aquila",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining for the Aquila2 model family",
    packages=find_packages(include=["megatron_aquila", "megatron_aquila.*"]),
    ext_modules=[helpers_extension],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    # A range that an installed torch satisfies installs nothing more; CI installs the CPU build first.
    install_requires=[
        # 2.10.0a0: NGC PyTorch 25.12's build (the Dockerfile) is a 2.10 pre-release; megatron_aquila/__init__.py
        # refuses an older torch at import with the version found.
        "torch>=2.10.0a0",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tokenizers>=0.15",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "transformers>=4.40", "peft>=0.21", "tensorboard>=2.14", "wandb>=0.16",
                 "bitsandbytes>=0.45",
                 "megatron-core==0.16.1"],  # Megatron-LM itself, to prove format and sample-stream compatibility
        "gpu": ["transformer-engine[pytorch]>=1.8", "flash-attn>=2.1"],  # 2.1: varlen + bottom-right causal
        "qlora": ["bitsandbytes>=0.45"],  # finetune.qlora: 4-bit NF4/FP4 base weights
        "wandb": ["wandb>=0.16"],
        "tensorboard": ["tensorboard>=2.14"],
    },
)
