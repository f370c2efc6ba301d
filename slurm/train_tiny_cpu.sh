#!/bin/bash
# The SLURM launch path end to end on CPUs, in a few minutes: a tiny Qwen2-shaped model, Seq-ALP on
# the synthetic copy task (configs/experiments/tiny_cpu_slurm.yaml), 2 trainer processes (TP 2 over
# gloo) and one local CPU rollout engine, both started by the launcher as srun steps exactly as
# the GPU scripts start torchrun and SGLang. tests/slurm submits it to a one-node SLURM; on a real
# cluster it is a smoke test of the installation (any CPU node will do).
#
#   sbatch slurm/train_tiny_cpu.sh [section.key=value ...]
#   bash slurm/train_tiny_cpu.sh --dry-run
#SBATCH --job-name=alp-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:20:00
#SBATCH --signal=B:TERM@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# shellcheck source-path=SCRIPTDIR disable=SC2034  # the variables below are read by lib/common.sh
CONFIG=configs/experiments/tiny_cpu_slurm.yaml
TRAINER_NODES=${TRAINER_NODES:-1}
GPUS_PER_NODE=0
TRAINER_PROCS=${TRAINER_PROCS:-2}
# Tiny model, data and converted checkpoint (python -m megatron_alp.demo.assets), made once; the
# warm start gives RL a signal to improve on (0 = skip it: the tests only check the launch).
ALP_TINY_ASSETS=${ALP_TINY_ASSETS:-runs/tiny_assets}
ALP_TINY_WARM_STEPS=${ALP_TINY_WARM_STEPS:-20}
# The trainer may take this long to checkpoint after SIGTERM (below the 60 s --signal lead).
export ALP_STOP_GRACE_S=${ALP_STOP_GRACE_S:-50}

# The repository: next to this file, or (sbatch runs a copy of it) the submit directory.
_self=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
[[ -f "$_self/lib/common.sh" ]] && ALP_REPO=${ALP_REPO:-$(dirname "$_self")}
ALP_REPO=${ALP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=lib/common.sh
source "$ALP_REPO/slurm/lib/common.sh" || { echo "alp: no slurm/lib/common.sh in $ALP_REPO (set ALP_REPO)" >&2; exit 2; }

cd "$ALP_REPO" || exit 2
if [[ " $* " != *" --dry-run "* && ! -f "$ALP_TINY_ASSETS/mcore/.done" ]]; then
  echo "alp: preparing the tiny assets in $ALP_TINY_ASSETS"
  "$ALP_PYTHON" -m megatron_alp.demo.assets --out "$ALP_TINY_ASSETS" --tp 1 --warm-steps "$ALP_TINY_WARM_STEPS" || exit 1
  touch "$ALP_TINY_ASSETS/mcore/.done"
fi
alp_main model.hf_path="$ALP_TINY_ASSETS/hf_warm" checkpoint.load="$ALP_TINY_ASSETS/mcore" \
  rollout.data.path="$ALP_TINY_ASSETS/copy_train.jsonl" "$@"
