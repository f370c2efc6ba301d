"""GPU-only parts of the checkpoint bus. Skipped without CUDA (CI and dev machines have none).

- tensor backend: CUDA tensors serialized as IPC handles are rebuilt, equal, in another process
  (what SGLang's /update_weights_from_tensor does with ``serialized_named_tensors``).
- nccl backend: the weight-update group formed as SGLang forms it, over NCCL, carries a flattened
  bucket of mixed dtypes from rank 0 to another GPU (needs 2 GPUs: NCCL refuses two ranks on one).
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CI and dev machines have none)")


def _named():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(64, 32, generator=g).bfloat16()), ("b.bias", torch.randn(17, generator=g)),
            ("c.weight", torch.randn(128, 128, generator=g).to(torch.float8_e4m3fn))]


def _ipc_child(data, q):
    import base64
    import pickle

    from rollout.bus.tensor import deserialize_named_tensors

    # Unpatched torch cannot rebuild it: the handle names the GPU by UUID, as SGLang's patched
    # reductions expect (srt/utils/patch_torch.py); deserialize_named_tensors applies the same patch.
    try:
        pickle.loads(base64.b64decode(data))
        unpatched_failed = False
    except Exception:  # noqa: BLE001
        unpatched_failed = True
    named = deserialize_named_tensors(data)
    q.put((unpatched_failed, [(n, t.cpu()) for n, t in named]))


def test_tensor_backend_ipc_handles_round_trip():
    from rollout.bus.tensor import serialize_named_tensors, tensor_payloads

    named = [(n, t.cuda()) for n, t in _named()]
    payloads = tensor_payloads(named, engine_tp_size=2)
    assert len(payloads) == 2 and payloads[0] == payloads[1]
    data = serialize_named_tensors(named)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_ipc_child, args=(data, q))
    p.start()
    unpatched_failed, got = q.get(timeout=120)
    p.join(timeout=60)
    assert unpatched_failed, "the payload must name the GPU by UUID (SGLang's reduction patch), not by index"
    assert len(got) == len(named)
    for (n, t), (m, u) in zip(named, got, strict=True):
        assert n == m and u.dtype == t.dtype and torch.equal(u.float(), t.cpu().float())


def _nccl_peer(port, q):
    from rollout.bus.distributed import join_update_group, unflatten_bucket

    torch.cuda.set_device(1)
    group = join_update_group("127.0.0.1", port, 1, 2, "bus-test", "nccl", 120)
    meta = q.get(timeout=120)
    flat = torch.empty(meta["size"], dtype=torch.uint8, device="cuda")
    group.broadcast(flat)
    torch.cuda.synchronize()
    q.put([(n, t.cpu()) for n, t in unflatten_bucket(flat, meta["names"], meta["dtypes"], meta["shapes"])])
    group.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs for two ranks")
def test_nccl_group_broadcasts_a_flattened_bucket():
    from rollout.bus.distributed import flatten_bucket, join_update_group
    from rollout.engines.processes import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_nccl_peer, args=(port, q))
    p.start()
    torch.cuda.set_device(0)
    group = join_update_group("127.0.0.1", port, 0, 2, "bus-test", "nccl", 120)
    named = [(n, t.cuda()) for n, t in _named()]
    flat, names, dtypes, shapes = flatten_bucket(named)
    q.put({"size": flat.numel(), "names": names, "dtypes": dtypes, "shapes": shapes})
    group.broadcast(flat)
    torch.cuda.synchronize()
    got = dict(q.get(timeout=120))
    p.join(timeout=60)
    group.close()
    for n, t in named:
        assert torch.equal(got[n].float(), t.cpu().float()), n
