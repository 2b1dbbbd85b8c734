#!/usr/bin/env bash
# Issue 22 on a GPU: the commands that measure what was built and proven on the CPU (custom ops under
# torch.compile, Triton at high rank, host work per layer). Run from the repository root with the
# project's venv active; MAIN is a checkout of the tree before issue 22 (for side-by-side host rows).
#
#     MAIN=/path/to/main/src bash benchmarks/gpu_issue22.sh 2>&1 | tee issue22-gpu.log
set -euxo pipefail
MAIN=${MAIN:-}

# 1. The GPU tests of what changed (bf16 kernels at every rank tile, compiled layers, opcheck on CUDA).
python -m pytest -q -p no:cacheprovider tests/adapters/test_kernels.py tests/adapters/test_ops.py \
    tests/training/test_compile.py

# 2. Compile time, DoRA vs LoRA, in one process (target: DoRA <= 1.5x LoRA), Inductor, bf16:
#    a tiny model, then one with the 1B width (several layers: per-layer cost shows).
python benchmarks/bench_compile.py --device cuda --dtype bfloat16 --backend inductor --repeats 3
python benchmarks/bench_compile.py --device cuda --dtype bfloat16 --backend inductor --repeats 2 \
    --width 2048 --layers 8 --rank 16 --batch 4096

# 3. The compiled step at the 1B shape (never measured before issue 22: > 300 s compiling before).
python benchmarks/bench_train_step.py --device cuda --preset llama-1b \
    --methods frozen+compile,dorakit-lora+compile,dorakit-dora+compile,dorakit-dora,peft-dora

# 4. High rank: the Triton path at r = 128 / 384 / 512 against the fused path and PEFT (8B-layer shapes
#    through bench_kernels, the whole 1B step through bench_train_step).
for r in 16 128 384 512; do python benchmarks/bench_kernels.py --rank "$r"; done
python benchmarks/bench_train_step.py --device cuda --preset llama-1b --rank 384 \
    --methods dorakit-dora,dorakit-dora-fused,peft-dora

# 5. Host time per layer (fwd + bwd): DoRA / LoRA, this tree against MAIN side by side when given.
if [ -n "$MAIN" ]; then
    python benchmarks/bench_host.py --device cuda --src "$MAIN" --src src
else
    python benchmarks/bench_host.py --device cuda
fi
