#!/usr/bin/env bash
# The one-command GPU check (docs/gpu.md section 7): on a machine with one CUDA GPU and no network,
#   bash tools/gpu_check.sh
# 1. builds the package offline (pip install --no-deps --no-build-isolation -e ., which compiles
#    csrc/helpers.cpp with pybind11; python setup.py build_ext --inplace if pip cannot);
# 2. runs the GPU tests: python -m pytest -m gpu tests (tests/test_gpu.py: bf16 CUDA vs fp32 CPU,
#    the context-parallel and packed-SFT attention masks on CUDA, the trainer under NCCL with exact
#    resume and HF export, the planner's memory against the GPU);
# 3. prints the single-GPU throughput benchmark, ours eager and with model.compile next to HF transformers
#    (benchmarks/bench_gpu_throughput.py --compile: Aquila2-7B width, seq 2048 and 4096).
# Needs torch with CUDA, transformers, tokenizers, safetensors, pybind11 and pytest; flash-attn,
# transformer-engine and apex are optional (the kernels line says what ran). The step time limits
# (90 + 60 s build, 180 s tests, 240 s benchmark) end the whole check within 10 minutes even when a
# step hangs. Exit status 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
status=0
step() { echo; echo "== $* [$((SECONDS - started)) s]"; }

step "environment"
python - <<'EOF' || exit 2
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("tools/gpu_check.sh: torch.cuda.is_available() is False; this check needs a CUDA GPU")
free, total = torch.cuda.mem_get_info()
optional = ", ".join(f"{name} {'yes' if importlib.util.find_spec(name) else 'no'}"
                     for name in ("flash_attn", "transformer_engine", "apex"))
print(f"python {sys.version.split()[0]}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}; {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name()} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free); {optional}")
EOF

step "build: pip install --no-deps --no-build-isolation -e ."
if ! timeout 90 python -m pip install --no-deps --no-build-isolation --no-index -e .; then
    echo "pip could not install the package; building the C++ helpers in place instead"
    timeout 60 python setup.py build_ext --inplace || exit 2
fi
python -c "from megatron_aquila.data import _helpers; print('C++ helpers:', _helpers.__file__)" || exit 2

step "GPU tests: python -m pytest -m gpu tests"
if python -c "import pytest" 2>/dev/null; then
    timeout 180 python -m pytest -m gpu tests -q -rs -s -p no:cacheprovider || status=1
else
    echo "pytest is not installed: the GPU tests cannot run (install it: pip install pytest, or its wheel offline)"
    status=1
fi

step "throughput: python benchmarks/bench_gpu_throughput.py --compile"
timeout 240 python benchmarks/bench_gpu_throughput.py --compile || status=1

step "done: $([ "$status" = 0 ] && echo "every step passed" || echo "FAILED, see above")"
exit "$status"
