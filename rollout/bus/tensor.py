"""The tensor backend: colocated engines on the trainer's GPUs, weights passed by CUDA IPC handle.

SGLang's ``/update_weights_from_tensor`` takes ``serialized_named_tensors``: one base64 string per
engine TP rank, each a ``ForkingPickler`` pickle of ``[(name, tensor), ...]``. Pickling a CUDA
tensor with ``torch.multiprocessing``'s reductions sends an IPC handle, not the bytes, so the
engine maps the trainer's memory and copies on the device. The trainer must keep the tensors
alive until the call returns. GPU only: without CUDA there is nothing to share.
(The colocated update of slime and verl works this way; the code is ours.)
"""

from __future__ import annotations

import base64
import io
from typing import List, Sequence, Tuple

import torch

from .manifest import BusError


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BusError("bus.backend = tensor needs CUDA: colocated engines share GPU memory through CUDA IPC "
                       "handles (use the disk or nccl backend without GPUs)")


def serialize_named_tensors(named: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """base64 of a ForkingPickler pickle (CUDA tensors travel as IPC handles)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions)

    buf = io.BytesIO()
    ForkingPickler(buf).dump([(n, t) for n, t in named])
    return base64.b64encode(buf.getvalue()).decode()


def deserialize_named_tensors(data: str) -> List[Tuple[str, torch.Tensor]]:
    """Inverse of :func:`serialize_named_tensors` (in another process, for CUDA tensors)."""
    import pickle

    import torch.multiprocessing  # noqa: F401

    return pickle.loads(base64.b64decode(data))


def tensor_payloads(named: Sequence[Tuple[str, torch.Tensor]], engine_tp_size: int) -> List[str]:
    """``serialized_named_tensors`` for an engine with ``engine_tp_size`` ranks (full tensors for each;
    every rank takes its own shard when loading)."""
    require_cuda()
    bad = [n for n, t in named if not t.is_cuda]
    if bad:
        raise BusError(f"the tensor backend sends CUDA tensors; {bad[:3]} are on the CPU")
    one = serialize_named_tensors(named)
    return [one] * int(engine_tp_size)


class TensorSender:
    """Same interface as :class:`rollout.bus.sender.DistributedSender`, for colocated engines."""

    def __init__(self, clients: Sequence, engine_tp_sizes: Sequence[int]):
        require_cuda()
        self.clients, self.tp_sizes = list(clients), list(engine_tp_sizes)
        self.errors: dict = {}
        self.broken = False
        self.bytes_sent = 0

    def connect(self) -> None:
        """Nothing to form: each call carries its own IPC handles."""

    def send_bucket(self, named: List[Tuple[str, torch.Tensor]]) -> None:
        from ..aio import submit

        named = [(n, t.cuda()) for n, t in named]  # kept alive until every engine answered
        futures = [(c, submit(c.update_weights_from_tensor(tensor_payloads(named, tp))))
                   for c, tp in zip(self.clients, self.tp_sizes) if c.url not in self.errors]
        for c, f in futures:
            try:
                f.result()
            except Exception as e:
                self.errors.setdefault(c.url, f"{type(e).__name__}: {e}")
        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in named)

    def close(self) -> None:
        from ..aio import submit

        for c in self.clients:
            submit(c.close()).result(timeout=30)
