#!/bin/bash
# Qwen2.5-7B, multi-turn tool-integrated reasoning with Seq-ALP: the ALP paper's setup
# (configs/experiments/train_7b_alp.yaml has the recipe and the memory estimate).
#
#   sbatch slurm/train_7b_alp.sh [section.key=value ...]     # from the repository root
#   bash slurm/train_7b_alp.sh --dry-run [section.key=value ...]   # validate anywhere, no GPUs
#
# Node split (4 nodes x 8 GPUs): nodes 0-1 train (16 GPUs: TP 4 x DP 4, ~33 GB per GPU estimated),
# nodes 2-3 run 8 SGLang engines each (TP 1), 16 engines. The run folder, checkpoints and the disk
# bus (runs/train_7b_alp/) must be on a filesystem every node sees. Adapting the #SBATCH lines to a
# cluster (partition, account, containers): docs/slurm.md.
#SBATCH --job-name=alp-7b
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT

# shellcheck source-path=SCRIPTDIR disable=SC2034  # the variables below are read by lib/common.sh
CONFIG=configs/experiments/train_7b_alp.yaml
TRAINER_NODES=${TRAINER_NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# After the time-limit warning (--signal lead, 900 s), the trainer may take this long to finish its
# step and checkpoint (a multi-turn rollout step takes minutes: watch perf/step_seconds).
export ALP_STOP_GRACE_S=${ALP_STOP_GRACE_S:-840}

# The repository: next to this file, or (sbatch runs a copy of it) the submit directory.
_self=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
[[ -f "$_self/lib/common.sh" ]] && ALP_REPO=${ALP_REPO:-$(dirname "$_self")}
ALP_REPO=${ALP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=lib/common.sh
source "$ALP_REPO/slurm/lib/common.sh" || { echo "alp: no slurm/lib/common.sh in $ALP_REPO (set ALP_REPO)" >&2; exit 2; }
alp_main "$@"
