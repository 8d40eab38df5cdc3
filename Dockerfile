# GPU image for megatron_aquila: NVIDIA's PyTorch container + transformer-engine, flash-attn, apex.
#
# NOT BUILT OR TESTED: the machine this project is developed on has no Docker engine and no GPU.
# The steps follow each library's documented source install; expect to adjust versions to your
# CUDA driver and GPU generation (TORCH_CUDA_ARCH_LIST below: 8.0 = A100/A800, 9.0 = H100/H800/H20).
#
#   docker build -t megatron-aquila:24.07 .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -it megatron-aquila:24.07
#
# Base: NGC PyTorch 24.07 (NVIDIA's PyTorch 2.4 build, CUDA 12.5, Python 3.10, NCCL; per the NGC
# release notes). The image already carries NVIDIA builds of transformer-engine, flash-attn and
# apex; the pinned reinstalls below make the versions explicit and reproducible. Every pip call
# uses --no-build-isolation (build against the container's torch) and never installs torch: a
# different torch wheel would replace NVIDIA's CUDA build.
FROM nvcr.io/nvidia/pytorch:24.07-py3

ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=8
ARG TRANSFORMER_ENGINE_VERSION=v1.8
ARG FLASH_ATTN_VERSION=2.5.8
ARG APEX_COMMIT=master
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Record the container's torch so that any later pip resolution that tries to change it fails.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /opt/torch-constraint.txt
ENV PIP_CONSTRAINT=/opt/torch-constraint.txt

# transformer-engine (PyTorch extension), built from its release branch against the container's torch.
RUN NVTE_FRAMEWORK=pytorch pip install --no-build-isolation \
        "git+https://github.com/NVIDIA/TransformerEngine.git@${TRANSFORMER_ENGINE_VERSION}"

# flash-attn 2: compiles its CUDA kernels (long: MAX_JOBS parallel nvcc jobs, several GB of RAM each).
RUN pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# apex from source with its C++ and CUDA extensions (fused RMSNorm and fused optimizers).
# Never `pip install apex` from PyPI: that is an unrelated package.
RUN git clone https://github.com/NVIDIA/apex /tmp/apex \
    && cd /tmp/apex && git checkout "${APEX_COMMIT}" \
    && pip install -v --no-build-isolation \
        --config-settings "--build-option=--cpp_ext" \
        --config-settings "--build-option=--cuda_ext" \
        . \
    && cd / && rm -rf /tmp/apex

# This project, editable, with its pybind11 C++ index helpers (csrc/helpers.cpp, compiled by setup.py).
WORKDIR /workspace/megatron_aquila
COPY . .
RUN pip install "pybind11>=2.10" \
    && pip install --no-build-isolation -e ".[tensorboard]" \
    && python -c "import megatron_aquila.data.helpers, megatron_aquila.model.kernels as k, torch; \
print(k.select_kernels('cuda', torch.bfloat16) if torch.cuda.is_available() else 'no GPU at build time')"

# One process per GPU: launch with torchrun (examples/aquila2/*/launch_torchrun.sh or launch_slurm.sh).
CMD ["bash"]
