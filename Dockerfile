# GPU image for megatron_aquila: NVIDIA's PyTorch container + flash-attn (pinned) and apex.
#
# NOT BUILT OR TESTED: the machine this project is developed on has no Docker engine and no GPU.
# The steps follow each library's documented source install; expect to adjust versions to your
# CUDA driver and GPU generation (TORCH_CUDA_ARCH_LIST below: 8.0 = A100/A800, 9.0 = H100/H800/H20).
#
#   docker build -t megatron-aquila:25.12 .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -it megatron-aquila:25.12
#
# Base: NGC PyTorch 25.12 (per its release notes: PyTorch 2.10.0a0, CUDA 13.1, Python 3.12, NCCL,
# transformer-engine). setup.py admits torch >= 2.10 and megatron_aquila refuses older ones at import
# (docs/gpu.md section 1 says which versions were actually run). The container pins its packages in
# /etc/pip/constraint.txt, so no pip call below can replace NVIDIA's torch; every pip call uses
# --no-build-isolation (build against the container's torch).
FROM nvcr.io/nvidia/pytorch:25.12-py3

ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=8
# flash-attn 2.8.3: flash_attn_varlen_func (packed SFT, model/packed_attention.py) and causal masks
# aligned bottom-right for q shorter than k (context parallelism), both since 2.1.
ARG FLASH_ATTN_VERSION=2.8.3
ARG APEX_COMMIT=master
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# transformer-engine: the container's own build (NGC ships it), used as is.

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
