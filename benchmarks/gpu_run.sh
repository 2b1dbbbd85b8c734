#!/usr/bin/env bash
# One GPU session's checks and measurements (issues 22 / 25), each step logged to $OUT (or ./gpu-logs).
# Run from the repository root on a CUDA machine with torch, transformers, peft and triton installed:
#     STEP=tests bash benchmarks/gpu_run.sh      # the gpu-marked tests + the kernel / op / compile tests on CUDA
#     STEP=rank bash benchmarks/gpu_run.sh       # high rank: 8B-layer and 32B-shaped stacks, r = 256 / 384 / 512
#     STEP=compile bash benchmarks/gpu_run.sh    # compile time and compiled steps, 1B and 8B-layer shapes
#     STEP=eager bash benchmarks/gpu_run.sh      # the eager 1B step
#     STEP=qdora bash benchmarks/gpu_run.sh      # NF4 base, 8B-layer shape: dorakit QDoRA / DoRA vs PEFT QDoRA / QLoRA
#     STEP=headline bash benchmarks/gpu_run.sh   # the README's headline table (the training loop, 1B shape)
#     STEP=multi bash benchmarks/gpu_run.sh      # many adapters on one base: generate(), 1B and 8B, DoRA and LoRA
#     STEP=decode bash benchmarks/gpu_run.sh     # batch-1 decoding, one unmerged adapter: the decode kernel vs auto
#     STEP=qdora2 bash benchmarks/gpu_run.sh     # 2 GPUs: QDoRA 8B under FSDP2, 1 vs 2 processes, params --memory, NCCL tests
# STEP may name several, comma-separated (STEP=tests,eager); each runs in turn, logged to $OUT/<step>.log.
set -uo pipefail
LOG=${OUT:-gpu-logs}; mkdir -p "$LOG"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
run() { echo "+ $*" | tee -a "$LOG/$STEP.log"; "$@" 2>&1 | tee -a "$LOG/$STEP.log"; }
for STEP in ${STEP//,/ }; do
python -c "import torch, sys; print(torch.__version__, torch.cuda.get_device_name(), sys.version)" | tee -a "$LOG/$STEP.log"
git log -1 --format='commit %H %cd' 2>/dev/null | tee -a "$LOG/$STEP.log"
case "$STEP" in
tests)
    run python -m pytest -q -p no:cacheprovider -m gpu tests --ignore tests/training/test_distributed.py \
        --ignore tests/test_docs.py -x --timeout 240
    run python -m pytest -q -p no:cacheprovider tests/adapters/test_kernels.py tests/adapters/test_ops.py \
        tests/training/test_compile.py -x --timeout 240 ;;
rank)
    for preset in llama-8b-4l 32b-2l; do for r in 256 384 512; do
        run python benchmarks/bench_train_step.py --device cuda --preset $preset --rank $r --steps 10 --warmup 3 \
            --methods dorakit-dora,peft-dora,peft-lora
    done; done ;;
compile)
    run python benchmarks/bench_compile.py --device cuda --dtype bfloat16 --backend inductor --repeats 2 \
        --width 2048 --layers 8 --rank 16 --batch 4096
    run python benchmarks/bench_train_step.py --device cuda --preset llama-1b --steps 10 --warmup 3 \
        --methods frozen+compile,dorakit-lora+compile,dorakit-dora+compile
    run python benchmarks/bench_train_step.py --device cuda --preset llama-1b --steps 10 --warmup 3 \
        --methods frozen+cudagraphs,dorakit-lora+cudagraphs,dorakit-dora+cudagraphs --profile ;;
eager)
    run python benchmarks/bench_train_step.py --device cuda --preset llama-1b --steps 10 --warmup 3 --rounds 2 \
        --methods frozen,dorakit-lora,dorakit-dora,peft-dora ;;
qdora)
    run python benchmarks/bench_train_step.py --device cuda --preset llama-8b-4l --steps 10 --warmup 3 \
        --methods dorakit-qdora,dorakit-qdora-torch,dorakit-qdora-fused,dorakit-dora,peft-qdora,peft-qlora ;;
compile8b)
    run python benchmarks/bench_train_step.py --device cuda --preset llama-8b-4l --steps 10 --warmup 3 \
        --methods frozen+compile,dorakit-lora+compile,dorakit-dora+compile ;;
headline)
    run python benchmarks/bench_train_loop.py --preset llama-1b --rounds 3 --steps 15 ;;
multi)
    run python -m pytest -q -p no:cacheprovider tests/adapters/test_gathered.py -x --timeout 240
    run python benchmarks/bench_multi_adapter.py --device cuda --presets llama-1b --methods dora,lora \
        --batches 1,32 --new-tokens 64 --repeats 3
    run python benchmarks/bench_multi_adapter.py --device cuda --presets llama-8b --methods dora,lora \
        --batches 1,32 --new-tokens 64 --repeats 2 ;;
decode)
    run python -m pytest -q -p no:cacheprovider tests/adapters/test_inference_call.py -x --timeout 240
    run python benchmarks/bench_decode.py --device cuda --preset llama-1b --rounds 3
    run python benchmarks/bench_decode.py --device cuda --preset llama-8b --rounds 2 --parts model
    run python benchmarks/bench_multi_adapter.py --device cuda --presets llama-1b --methods dora,lora \
        --batches 1,32 --repeats 3 --no-peft --backend triton ;;
qdora2)  # two GPUs (issue 27): QDoRA 8B with FSDP2 on 1 and 2 processes, same global batch; the NCCL tests
    for n in 1 2; do run python -m dorakit params --model llama3-8b --method dora --rank 16 --targets all-linear \
        --memory --base nf4 --gpus $n --batch-size 1 --seq-len 2048 || true; done
    run python benchmarks/bench_distributed.py --load-in-4bit --preset llama-8b --nprocs 1 2 --strategies fsdp \
        --same-global-batch --steps 12
    run python -m pytest -q -p no:cacheprovider -m gpu tests/training/test_distributed.py tests/training/test_distributed_quant.py \
        --timeout 300 ;;
*) echo "STEP must be tests, rank, compile, compile8b, eager, qdora, headline, multi, decode or qdora2" >&2; exit 2 ;;
esac
done
