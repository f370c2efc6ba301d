

# The demo's trainer processes (torchrun --nproc-per-node); bench/peer runs ours the same way.
TRAINER_PROCS = 2
