"""A ``torch_dist`` save strategy that writes in this process, synchronously.

Megatron-Core's ``TorchDistSaveShardedStrategy`` always writes through ``FileSystemWriterAsync``:
a ``multiprocessing.Manager`` queue plus forked writer processes, even with ``thread_count=1``
(what a plain ``thread_count=1`` strategy still does). On CPU that hangs (PLATFORM.md item 6),
and inside a daemonic worker (our spawned worlds) it fails at once ("daemonic processes are not
allowed to have children"). This strategy keeps Megatron's translation of ``ShardedTensor``s to
PyTorch's distributed-checkpoint items and Megatron's planner, and hands them to
``torch.distributed.checkpoint.save`` with the standard in-process ``FileSystemWriter``. The files
are the same ``torch_dist`` format (``__<rank>_<i>.distcp`` + ``.metadata``) and load with
Megatron's stock ``TorchDistLoadShardedStrategy`` at any TP/PP.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)


class InProcessTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """Synchronous, single-process-per-rank ``torch_dist`` writer (works on CPU and GPU)."""

    def __init__(self) -> None:
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp

        sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded, False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, single_file_per_rank=True)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)

    def async_save(self, sharded_state_dict, checkpoint_dir: Path):
        raise NotImplementedError("InProcessTorchDistSaveStrategy writes synchronously; call save()")
