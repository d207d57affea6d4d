# Shared by the launchers: run_commands DRY_RUN CMD... prints the commands (dry run) or starts them all in the
# background and waits, failing if any fails. Each CMD is "VAR=value ... program args" as one string.
run_commands() {
  local dry_run="$1"
  shift
  if [ "$dry_run" -eq 1 ]; then
    printf '%s\n' "$@"
    return 0
  fi
  local pids=() status=0 c p
  for c in "$@"; do
    bash -c "exec env $c" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do
    wait "$p" || status=$?
  done
  return "$status"
}

# distributed_flags N I PORT: the flags that make process I of N join through a coordinator on localhost:PORT.
distributed_flags() {
  echo "--config.distributed.enabled=True --config.distributed.coordinator_address=localhost:$3 \
--config.distributed.num_processes=$1 --config.distributed.process_id=$2"
}
