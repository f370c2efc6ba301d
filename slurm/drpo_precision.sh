#!/bin/bash
# The DRPO paper's precision matrix (configs/experiments/drpo_precision/: Qwen3-4B-Base, 64 x 8):
# {grpo, dppo, drpo} x {bf16, fp8_rollout, fp8_e2e}, one cell per job, each in its own run folder
# (runs/drpo_precision_<method>_<precision>/, with its own bus). docs/experiments.md compares them.
#
#   sbatch slurm/drpo_precision.sh drpo fp8_rollout [section.key=value ...]   # one cell by name
#   sbatch --array=0-8 slurm/drpo_precision.sh [section.key=value ...]        # the 9 cells (index:
#          method-major: 0-2 grpo, 3-5 dppo, 6-8 drpo; within each bf16, fp8_rollout, fp8_e2e)
#   bash slurm/drpo_precision.sh --dry-run drpo fp8_rollout                    # validate one cell
#
# Node split (2 nodes x 8 GPUs): node 0 trains (TP 2 + SP, DP 4), node 1 runs the SGLang engine.
# FP8 rollout cells start SGLang on bus version 0, written in block FP8 from model.hf_path by a step
# before the engines (megatron_alp/sync/v0.py); fp8_e2e also checks Transformer Engine and the
# blockwise recipe on the trainer node first. Set model.hf_path / rollout.data.path as in
# docs/experiments.md (the run folders and the bus must be on a filesystem both nodes see).
#SBATCH --job-name=drpo-precision
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT

METHODS=(grpo dppo drpo)
PRECISIONS=(bf16 fp8_rollout fp8_e2e)

# The cell: METHOD PRECISION as the first two words, else the array index.
_args=() _cell=()
for _a in "$@"; do
  if [[ "$_a" != --* && "$_a" != *=* && ${#_cell[@]} -lt 2 ]]; then _cell+=("$_a"); else _args+=("$_a"); fi
done
if (( ${#_cell[@]} == 2 )); then
  METHOD=${_cell[0]} PRECISION=${_cell[1]}
elif (( ${#_cell[@]} == 0 )) && [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  METHOD=${METHODS[SLURM_ARRAY_TASK_ID / 3]:-} PRECISION=${PRECISIONS[SLURM_ARRAY_TASK_ID % 3]:-}
else
  echo "alp: name the cell (METHOD PRECISION: ${METHODS[*]} x ${PRECISIONS[*]}) or submit with --array=0-8" >&2
  exit 2
fi
if [[ " ${METHODS[*]} " != *" $METHOD "* || " ${PRECISIONS[*]} " != *" $PRECISION "* ]]; then
  echo "alp: no cell '$METHOD $PRECISION' (methods: ${METHODS[*]}; precisions: ${PRECISIONS[*]})" >&2
  exit 2
fi
RUN_NAME=drpo_precision_${METHOD}_${PRECISION}

# shellcheck disable=SC2034  # the variables below are read by lib/common.sh
CONFIG=configs/experiments/drpo_precision/${METHOD}_${PRECISION}.yaml
TRAINER_NODES=${TRAINER_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export ALP_STOP_GRACE_S=${ALP_STOP_GRACE_S:-840}

# The repository: next to this file, or (sbatch runs a copy of it) the submit directory.
_self=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
[[ -f "$_self/lib/common.sh" ]] && ALP_REPO=${ALP_REPO:-$(dirname "$_self")}
ALP_REPO=${ALP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=lib/common.sh
source "$ALP_REPO/slurm/lib/common.sh" || { echo "alp: no slurm/lib/common.sh in $ALP_REPO (set ALP_REPO)" >&2; exit 2; }
echo "alp: DRPO precision cell $METHOD x $PRECISION ($CONFIG)"
alp_main "run.name=$RUN_NAME" "bus.dir=runs/$RUN_NAME/bus" "${_args[@]}"
