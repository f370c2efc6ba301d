# shellcheck shell=bash
# Shared by every slurm/train_*.sh: the job's environment (every variable explained), the Python
# that runs it, and the two entry points. Sourced, never run. A script sets
#
#   CONFIG          experiment YAML (relative to the repository root)
#   TRAINER_NODES   how many of the allocation's nodes train (the rest run rollout engines)
#   GPUS_PER_NODE   GPUs per node (0 = a CPU job: gloo trainer, local CPU engines)
#   TRAINER_PROCS   CPU jobs only: trainer processes per node
#   TRAINER_GPUS    one-node GPU jobs only: GPUs for the trainer (the rest serve engines)
#
# then calls `alp_main "$@"`: with --dry-run it validates the job on any machine (no GPUs, no
# SLURM) and prints the plan; inside a job it execs the supervisor
# (megatron_alp/launch/supervisor.py), which starts engines and trainer as srun steps.
# Launcher settings read from the environment (set them before sbatch; sbatch passes them on):
#
#   ALP_REPO        repository root (default: the submit directory; sbatch copies the script away)
#   ALP_PYTHON      Python with megatron-alp installed (default: $ALP_REPO/.venv/bin/python, else python3)
#   ALP_SRUN_ARGS   extra options for every srun step (pyxis: --container-mounts=... --container-workdir=...)
#   ALP_TRAINER_SRUN_ARGS / ALP_ENGINE_SRUN_ARGS  the trainer's / engines' own (pyxis: --container-image=...)
#   ALP_STEP_PREFIX, ALP_TRAINER_PREFIX / ALP_ENGINE_PREFIX  command prefix of every / the trainer's /
#                   the engines' steps (apptainer: "apptainer exec --nv IMAGE.sif")
#   ALP_STEP_PYTHON Python inside the trainer's steps when it differs from ALP_PYTHON (a container's)
#   ALP_ENGINE_PYTHON Python of the engine step and of SGLang (default: ALP_STEP_PYTHON)
#   ALP_API_KEY     engine API key (default: a random key per job; "none" = no key, private networks only)
#   ALP_GPU_MEM_GB  GPU memory used by the memory estimate (default 80)
#   ALP_STOP_GRACE_S  after the batch shell's SIGTERM (#SBATCH --signal=B:TERM@<lead>), how long the
#                   trainer may take to finish its step and checkpoint before it is cancelled; keep
#                   it below the lead, and the lead above one RL step + one checkpoint (default 600)
#   ALP_REQUEUE     1 = requeue the job after a SIGTERM stop, planned or step-wide (the scripts
#                   carry #SBATCH --requeue and --open-mode=append)
#   NODES           dry run only: node count (default: the script's #SBATCH --nodes)

# ---- environment of every step (the steps inherit it: sbatch/srun --export=ALL) -------------
# Logs reach the job output as they are written, not when a buffer fills.
export PYTHONUNBUFFERED=1
# CPU threads per process (torch intra-op, OpenMP). GPU work needs few; torchrun would set 1 with a
# warning. CPU jobs: the local engine takes rollout.local.threads instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# HF tokenizers' own thread pool deadlocks after fork (the tool sandbox forks); keep it serial.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# Megatron: one hardware work queue per GPU, so that its tensor/sequence-parallel communication
# kernels run in the order they are issued and overlap with compute as scheduled (Megatron-LM's
# example scripts set it; slime exports it for every process too).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL prints failures with their reason (INFO for debugging topology/transport choices).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A failed or timed-out NCCL collective tears the process down instead of hanging, so a dead rank
# ends the trainer step (and the job) rather than blocking it until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Async collectives do not use recordStream: their buffers are freed when the work completes,
# which lowers peak memory (recommended by Megatron-LM).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# torchrun runs with SIGTERM ignored (launch/node.py): a step-wide SIGTERM (preemption) reaches the
# trainer processes, which checkpoint. Should torchrun still stop its workers (SIGINT, SIGHUP), it
# gives them this long before SIGKILL (torch >= 2.12; older versions: 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-60}
# Cluster-specific, set them for your fabric (docs/slurm.md):
#   export NCCL_SOCKET_IFNAME=ib0        # interface for NCCL's bootstrap/socket traffic (and the nccl
#                                        # bus's per-node address; GLOO_SOCKET_IFNAME for gloo)
#   export NCCL_IB_HCA=mlx5_0,mlx5_1     # InfiniBand adapters NCCL may use
#   export HF_HOME=/shared/hf            # HF cache on a shared filesystem (hub ids in configs)
#   export HF_HUB_OFFLINE=1              # compute nodes without internet: fail fast on a missing model

# ---- where things are -------------------------------------------------------------------------
ALP_SCRIPT=${ALP_SCRIPT:-${BASH_SOURCE[1]:-$0}}
ALP_REPO=$(cd "${ALP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
if [[ -z "${ALP_PYTHON:-}" ]]; then
  if [[ -x "$ALP_REPO/.venv/bin/python" ]]; then ALP_PYTHON="$ALP_REPO/.venv/bin/python"; else ALP_PYTHON=python3; fi
fi

# The value of `#SBATCH --<name>=<value>` in the calling script (the dry run's defaults).
alp_sbatch_value() {
  sed -n "s/^#SBATCH[[:space:]]\{1,\}--$1=\([^[:space:]]*\).*/\1/p" "$ALP_SCRIPT" | head -n 1
}

# GPUs per node inside a job: what SLURM allocated (SLURM_GPUS_ON_NODE), else the script's value.
alp_gpus_per_node() {
  local g=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-0}}
  echo "${g##*:}"  # "a100:8" -> 8
}

alp_main() {
  local dry=0 a
  local -a overrides=()
  for a in "$@"; do
    if [[ "$a" == --dry-run ]]; then dry=1; else overrides+=("$a"); fi
  done
  cd "$ALP_REPO" || exit 2
  if [[ ! -f "$CONFIG" ]]; then
    echo "alp: $CONFIG not found under ALP_REPO=$ALP_REPO (submit from the repository root or set ALP_REPO)" >&2
    exit 2
  fi
  local -a job=(--config "$CONFIG" --gpus-per-node "$(alp_gpus_per_node)" --gpu-mem-gb "${ALP_GPU_MEM_GB:-80}")
  [[ -n "${TRAINER_NODES:-}" ]] && job+=(--trainer-nodes "$TRAINER_NODES")
  [[ -n "${TRAINER_PROCS:-}" ]] && job+=(--trainer-procs "$TRAINER_PROCS")
  [[ -n "${TRAINER_GPUS:-}" ]] && job+=(--trainer-gpus "$TRAINER_GPUS")
  [[ "${ALP_API_KEY:-}" == none ]] && job+=(--no-api-key)
  if (( dry )); then
    local nodes=${NODES:-$(alp_sbatch_value nodes)}
    exec "$ALP_PYTHON" -m megatron_alp.launch.plan --nodes "${nodes:-1}" "${job[@]}" "${overrides[@]}"
  fi
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "alp: not inside a SLURM job: submit it with 'sbatch $ALP_SCRIPT', or check it with '--dry-run'" >&2
    exit 2
  fi
  echo "alp: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, repository $ALP_REPO, python $ALP_PYTHON"
  # The supervisor replaces this shell, so #SBATCH --signal=B:TERM reaches it directly.
  exec "$ALP_PYTHON" -m megatron_alp.launch.supervisor "${job[@]}" "${overrides[@]}"
}
