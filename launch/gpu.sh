#!/usr/bin/env bash
# One node with N GPUs. By default one process drives every local GPU (the usual JAX setup); with
# --process_per_gpu, N processes (one GPU each, CUDA_VISIBLE_DEVICES) join through jax.distributed.
#
#   launch/gpu.sh [--dry_run] [--gpus=N] [--process_per_gpu] [--port=PORT] -- [trapo_jax.main flags...]
#   launch/gpu.sh --gpus=8 -- --config=experiments/configs/trapo_qwen25_math_7b.py --workdir=/data/run1 \
#       --config.model.hf_dir=/data/Qwen2.5-Math-7B --config.data.path=/data/OpenR1-Math-220k/data
# Install first: pip install -r requirements-cuda12.txt (the pinned jax with its CUDA 12 plugin)
set -euo pipefail
gpus="" per_gpu=0 port=12355 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --gpus=*) gpus="${1#*=}" ;;
    --process_per_gpu) per_gpu=1 ;;
    --port=*) port="${1#*=}" ;;
    --) shift; break ;;
    *) echo "gpu.sh: unknown option $1 (main's flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "$gpus" -gt 0 ] 2>/dev/null || { echo "gpu.sh: --gpus=N is required (nvidia-smi found no GPU)" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."
. launch/common.sh
cmds=()
if [ "$per_gpu" -eq 0 ]; then
  cmds+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) python -m trapo_jax.main $*")
else
  for ((i = 0; i < gpus; i++)); do
    cmds+=("CUDA_VISIBLE_DEVICES=$i python -m trapo_jax.main $* $(distributed_flags "$gpus" "$i" "$port")")
  done
fi
run_commands "$dry_run" "${cmds[@]}"
