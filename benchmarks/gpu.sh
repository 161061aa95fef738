#!/usr/bin/env bash
# Every GPU measurement that issue 5 asks for, on one CUDA device, in one go (or part by part).
#
#   bash benchmarks/gpu.sh [train|lowmem|offload|gen|all] [RESULTS_DIR]
#
#   train   cdiff against the diffusers-example approach: SD 1.x, 512 px, batch 8, 250 real steps, bf16
#           (target on one H100: under 45 s including latent caching, under 10 GB)
#   lowmem  --low-memory at 512 px, batch 2, with each process capped at 7 GiB of GPU memory, as on an
#           8 GB card once the CUDA context has its share (the baseline with its gradient checkpointing)
#   offload cdiff's --low-memory --offload at 512 px, batch 2, capped at 2 GiB (traced: 0.57 GiB of tensors),
#           and --low-memory alone uncapped in the same run for the step-time cost of the transfers
#   gen     cdiff gen against the plain pipeline at 512 px, 25 steps, fp16; applying a delta; a merge
#
# The random full-size SD 1.x model is built once into $CDIFF_BENCH_MODEL (default /tmp/cdiff-bench-sd15).
# Python packages missing on the GPU machine (diffusers, platformdirs, ...) are installed from .whl/ if
# that folder exists (see the device tool's README for how to fill it).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
out=${2:-${OUT:-benchmarks/results}}
model=${CDIFF_BENCH_MODEL:-/tmp/cdiff-bench-sd15}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"

if [[ $part == train || $part == all ]]; then
    $py benchmarks/bench_train.py --device cuda --model-dir "$model" --resolution 512 --batch-size 8 --steps 250 \
        --precision bf16 --out "$out/bench_train-cuda.json"
fi
if [[ $part == lowmem || $part == all ]]; then
    $py benchmarks/bench_train.py --device cuda --model-dir "$model" --resolution 512 --batch-size 2 --steps 30 \
        --precision bf16 --low-memory --memory-cap-gb 7 --out "$out/bench_train-cuda-lowmem.json"
fi
if [[ $part == offload || $part == all ]]; then
    $py benchmarks/bench_train.py --device cuda --model-dir "$model" --resolution 512 --batch-size 2 --steps 30 \
        --precision bf16 --low-memory --offload --trainers cdiff --memory-cap-gb 2 --out "$out/bench_train-cuda-offload.json"
    $py benchmarks/bench_train.py --device cuda --model-dir "$model" --resolution 512 --batch-size 2 --steps 30 \
        --precision bf16 --low-memory --trainers cdiff --out "$out/bench_train-cuda-lowmem-cdiff.json"
fi
if [[ $part == gen || $part == all ]]; then
    $py benchmarks/bench_gen.py --device cuda --model-dir "$model" --precision fp16 --resolution 512 --steps 25 --repeats 3 \
        --out "$out/bench_gen-cuda.json"
fi
