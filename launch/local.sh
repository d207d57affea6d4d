#!/usr/bin/env bash
# CPU runs on this machine: one process with N simulated devices, or P processes x N devices (gloo collectives).
#
#   launch/local.sh [--dry_run] [--devices=N] [--processes=P] [--port=PORT] -- [trapo_jax.main flags...]
#   launch/local.sh --devices=8 -- --config=experiments/configs/default.py --workdir=runs/local8
#   launch/local.sh --processes=2 --devices=4 -- --workdir=runs/two_procs
set -euo pipefail
devices=1 processes=1 port=12355 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --devices=*) devices="${1#*=}" ;;
    --processes=*) processes="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (main's flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
. launch/common.sh
env_vars="JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
cmds=()
if [ "$processes" -eq 1 ]; then
  cmds+=("$env_vars python -m trapo_jax.main $*")
else
  for ((i = 0; i < processes; i++)); do
    # Processes of one machine live and die together: a lost one stops the others within 10 s, not a pod's 60.
    cmds+=("$env_vars python -m trapo_jax.main $* $(distributed_flags "$processes" "$i" "$port") \
--config.distributed.heartbeat_timeout_s=10")
  done
fi
run_commands "$dry_run" "${cmds[@]}"
