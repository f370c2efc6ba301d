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


_DEVICE_ARG = 6
"""Position of the device index in ``torch.multiprocessing.reductions.rebuild_cuda_tensor``'s
arguments (SGLang's patch uses the same constant, ``_REDUCE_TENSOR_ARG_DEVICE_INDEX``)."""


def with_device_uuid(args: tuple, uuid_of) -> tuple:
    """``reduce_tensor``'s CUDA rebuild arguments with the device index replaced by its UUID."""
    if len(args) <= _DEVICE_ARG or not isinstance(args[_DEVICE_ARG], int):
        return args
    return (*args[:_DEVICE_ARG], uuid_of(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])


def device_from_uuid(device, uuids: Sequence[str]) -> int:
    """The local index of a device named by UUID (an int passes through), as SGLang resolves it."""
    if isinstance(device, int):
        return device
    for i, u in enumerate(uuids):
        if u == device:
            return i
    raise BusError(f"IPC handle names GPU {device}, which this process does not see (visible: {list(uuids)})")


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_with_uuid(t: torch.Tensor):
    from torch.multiprocessing import reductions

    fn, args = reductions.reduce_tensor(t)
    return (fn, with_device_uuid(args, _uuid)) if t.is_cuda else (fn, args)


def serialize_named_tensors(named: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """base64 of a ForkingPickler pickle; CUDA tensors travel as IPC handles naming their GPU by UUID.

    SGLang 0.5.23 deserialises with ``MultiprocessingSerializer`` after
    ``monkey_patch_torch_reductions()`` (srt/utils/patch_torch.py): its ``rebuild_cuda_tensor``
    maps a device UUID to the engine process's own index (an int is taken as-is, which names the
    wrong GPU whenever the two processes see different ``CUDA_VISIBLE_DEVICES``; older releases
    assert a UUID). The rebuild function is pickled by name (``torch.multiprocessing.reductions.
    rebuild_cuda_tensor``) so the engine's patched one runs. Idea from SGLang's patch; code ours.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions)

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table[torch.Tensor] = _reduce_with_uuid
    pickler.dispatch_table[torch.nn.Parameter] = _reduce_with_uuid
    pickler.dump([(n, t) for n, t in named])
    return base64.b64encode(buf.getvalue()).decode()


def install_uuid_rebuild() -> None:
    """In a receiving process: make ``rebuild_cuda_tensor`` accept a device UUID, as SGLang's
    ``monkey_patch_torch_reductions`` does in the engine (tests and the local side use it). Idempotent."""
    from torch.multiprocessing import reductions

    if getattr(reductions.rebuild_cuda_tensor, "_megatron_alp_uuid", False):
        return
    original = reductions.rebuild_cuda_tensor

    def rebuild(*args):
        uuids = [_uuid(i) for i in range(torch.cuda.device_count())]
        args = list(args)
        args[_DEVICE_ARG] = device_from_uuid(args[_DEVICE_ARG], uuids)
        return original(*args)

    rebuild._megatron_alp_uuid = True
    reductions.rebuild_cuda_tensor = rebuild


def deserialize_named_tensors(data: str) -> List[Tuple[str, torch.Tensor]]:
    """Inverse of :func:`serialize_named_tensors` (in another process, for CUDA tensors)."""
    import pickle

    import torch.multiprocessing  # noqa: F401

    install_uuid_rebuild()
    return pickle.loads(base64.b64decode(data))


def tensor_payloads(named: Sequence[Tuple[str, torch.Tensor]], engine_tp_size: int) -> List[str]:
    """``serialized_named_tensors`` for an engine with ``engine_tp_size`` ranks: one payload per
    engine GPU (SGLang's TP rank ``r`` reads entry ``r``), each the full tensors; every rank takes
    its own shard when loading."""
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
                   for c, tp in zip(self.clients, self.tp_sizes, strict=True) if c.url not in self.errors]
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
