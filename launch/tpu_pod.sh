#!/usr/bin/env bash
# A Cloud TPU pod slice: create it, copy this repository's source (tracked and unignored files: no runs/, venvs or
# caches) to every worker, install the pinned requirements (requirements-tpu.txt), run the same command on
# --worker=all (one process per host; jax.distributed finds its peers from the TPU metadata), stream the logs,
# delete the slice (KEEP=1 keeps it).
#
# Required: TPU_NAME ZONE PROJECT ACCELERATOR_TYPE (e.g. v5p-32, v6e-64) WORKDIR (gs://bucket/run: shared by hosts)
# Optional: CONFIG (default experiments/configs/trapo_qwen25_math_7b.py), RUNTIME_VERSION (default
#   v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e), EXTRA_ARGS (more --config.*
#   flags: the weights and data, on gs:// since the hosts share a bucket, not a disk), KEEP=1, SPOT=1
#
#   TPU_NAME=trapo ZONE=us-east5-a PROJECT=my-proj ACCELERATOR_TYPE=v5p-32 WORKDIR=gs://b/runs/trapo7b \
#     EXTRA_ARGS="--config.model.hf_dir=gs://b/models/Qwen2.5-Math-7B --config.data.path=gs://b/data/openr1" \
#     launch/tpu_pod.sh [--dry_run]
# A preempted run resumes from WORKDIR's latest checkpoint: run the same command again.
set -euo pipefail
dry_run=0
[ "${1:-}" = "--dry_run" ] && dry_run=1
for v in TPU_NAME ZONE PROJECT ACCELERATOR_TYPE WORKDIR; do
  [ -n "${!v:-}" ] || { echo "tpu_pod.sh: environment variable $v is required" >&2; exit 2; }
done
case "$WORKDIR" in
  gs://*) ;;
  *) echo "tpu_pod.sh: WORKDIR=$WORKDIR must be a gs:// path: every host of the slice writes to it" >&2; exit 2 ;;
esac
CONFIG="${CONFIG:-experiments/configs/trapo_qwen25_math_7b.py}"
case "$ACCELERATOR_TYPE" in
  v6e*) default_runtime=v2-alpha-tpuv6e ;;
  v5litepod*|v5e*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=v2-alpha-tpuv5 ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"
gc="gcloud compute tpus tpu-vm"
at="--zone=$ZONE --project=$PROJECT"
run() {
  if [ "$dry_run" -eq 1 ]; then echo "$*"; else echo "+ $*" >&2; eval "$@"; fi
}
cd "$(dirname "$0")/.."
archive=/tmp/trapo_jax_src.tar.gz
run "$gc create $TPU_NAME $at --accelerator-type=$ACCELERATOR_TYPE --version=$RUNTIME_VERSION${SPOT:+ --spot}"
cleanup() { [ "${KEEP:-0}" = 1 ] || run "$gc delete $TPU_NAME $at --quiet"; }
[ "$dry_run" -eq 1 ] || trap cleanup EXIT
run "git ls-files -z --cached --others --exclude-standard | tar --null -czf $archive -T -"
run "$gc scp $archive $TPU_NAME:/tmp/ $at --worker=all"
run "$gc ssh $TPU_NAME $at --worker=all --command='mkdir -p ~/trapo_jax && tar -xzf $archive -C ~/trapo_jax && \
cd ~/trapo_jax && pip install -q -r requirements-tpu.txt'"
run "$gc ssh $TPU_NAME $at --worker=all --command='cd ~/trapo_jax && python -m trapo_jax.main --config=$CONFIG \
--workdir=$WORKDIR --config.distributed.enabled=True ${EXTRA_ARGS:-} 2>&1 | tee -a ~/trapo_jax.log'"
[ "$dry_run" -eq 0 ] || cleanup
