"""SLURM launch: plan a job (node split, topology, memory estimate), start it, supervise it.

- :mod:`.memory`     per-GPU memory estimates of the trainer and the SGLang engines;
- :mod:`.topology`   node list -> trainer nodes, rollout nodes, engine URLs, rendezvous address;
- :mod:`.checks`     the config loaded for the planned world size, and the paths it names;
- :mod:`.plan`       the dry run (``python -m megatron_alp.launch.plan CONFIG --nodes N ...``);
- :mod:`.engines_spec` each rollout node's server commands, the weights they start on, /health;
- :mod:`.srun`       the srun / scancel / squeue command lines;
- :mod:`.supervisor` the process the batch script becomes: engines, health, trainer, failures, signals;
- :mod:`.node`       what each srun task runs on its node (the engines of that node, or torchrun).

The shell side is ``slurm/lib/common.sh`` (environment, repository, dry run) and the thin
``slurm/train_*.sh`` scripts; docs/slurm.md explains how to adapt them to a cluster.
"""
