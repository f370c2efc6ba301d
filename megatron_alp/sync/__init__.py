"""The trainer's side of the checkpoint bus: export (Megatron shards -> HF-named tensors), publish, weight sync."""
