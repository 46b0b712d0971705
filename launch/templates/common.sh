# ---- common part of every m2megatron job (launch/templates/common.sh, inlined by the submit helper)
ATTEMPT=${SLURM_RESTART_COUNT:-0}
LOG_DIR="$RUN_DIR/logs/$KIND-$SLURM_JOB_ID.$ATTEMPT"
mkdir -p "$LOG_DIR"
export RUN_DIR CODE_DIR LOG_DIR  # m2_task runs in a new shell on every node
{{setup}}
{{venv}}
export PYTHONPATH="$CODE_DIR${PYTHONPATH:+:$PYTHONPATH}"
cd "$CODE_DIR"
# The first node of the allocation hosts the rendezvous; the port depends on the job id only, so every
# attempt of a requeued job uses the same one.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT={{master_port}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
{{env}}
m2_log "$KIND job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST ($SLURM_NNODES nodes):" \
     "master $MASTER_ADDR:$MASTER_PORT, code $CODE_DIR, logs $LOG_DIR"

# One call of m2_task per Slurm task (srun runs it through `bash -c`; `export -f` carries it over).
{{task_function}}
export -f m2_task

# Start the job step in the background and wait for it, so that traps run while it is going.
m2_run_step() {
  {{srun}} &
  M2_STEP_PID=$!
  local rc=0
  while :; do
    wait "$M2_STEP_PID"
    rc=$?
    kill -0 "$M2_STEP_PID" 2>/dev/null || break  # still running: wait was interrupted by a trapped signal
  done
  m2_log "job step finished with status $rc"
  return "$rc"
}
