"""The GPU-path fixes that a CPU can show: device placement, collective devices, config refusals,
FP8 padding, spawned workers' CUDA visibility, the IPC UUID rewrite, the optimizer-state loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from megatron_alp.config import load_config
from megatron_alp.runtime.device import collective_device, collective_tensor, compute_device, to_device
from megatron_alp.runtime.placement import check_gpu_placement
from megatron_alp.trainer.batching import seq_pad_multiple


@dataclass
class _Batch:
    tokens: torch.Tensor
    mask: Optional[torch.Tensor] = None
    name: str = "x"


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    b = _Batch(tokens=torch.arange(6).view(2, 3))
    out = to_device(b)
    assert out is not b and out.tokens.device == compute_device() and out.mask is None and out.name == "x"
    assert torch.equal(out.tokens.cpu(), b.tokens)
    meta = to_device(b, torch.device("meta"))
    assert meta.tokens.device.type == "meta"
    with pytest.raises(TypeError, match="dataclass"):
        to_device({"tokens": b.tokens})


def test_collective_device_follows_the_backend():
    assert collective_device(backend="gloo") == torch.device("cpu")
    assert collective_tensor([1.0, 2.0], backend="gloo").device.type == "cpu"
    if torch.cuda.is_available():
        assert collective_device(backend="nccl").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="NCCL"):
            collective_device(backend="nccl")


def test_seq_pad_multiple_covers_sp_and_fp8_alignment():
    cfg = load_config(None, [])
    assert seq_pad_multiple(cfg.parallel, cfg.precision) == 1
    cfg.parallel.tp, cfg.parallel.sequence_parallel = 4, True
    assert seq_pad_multiple(cfg.parallel, cfg.precision) == 4
    cfg.precision.train = "fp8"
    m = seq_pad_multiple(cfg.parallel, cfg.precision)
    assert m % 4 == 0 and (m // 4) % 16 == 0  # each TP rank's share stays a multiple of 16


def test_fp8_delayed_with_bf16_edges_is_refused_at_load():
    with pytest.raises(ValueError, match="fp8_keep_first_last_bf16"):
        load_config(None, ["precision.train=fp8", "precision.fp8_recipe=delayed"])


def test_context_parallel_is_refused():
    cfg = load_config(None, ["parallel.cp=2"])
    with pytest.raises(ValueError, match="parallel.cp"):
        check_gpu_placement(cfg, world=2, local_world=2)


@pytest.mark.parametrize("overrides,world,local,why", [
    (["rollout.engine=sglang", "rollout.urls=[http://h:1]"], 1, 1, "rollout.urls"),
    (["rollout.engine=local"], 1, 1, "rollout.engine"),
    (["rollout.engine=sglang"], 16, 8, "nodes"),
    (["rollout.engine=sglang", "rollout.num_engines=2", "rollout.sglang.tp_size=2"], 2, 2, "engine GPUs"),
])
def test_tensor_bus_needs_true_colocation(overrides, world, local, why):
    cfg = load_config(None, ["bus.backend=tensor", *overrides])
    with pytest.raises(ValueError, match=why):
        check_gpu_placement(cfg, world, local)


def test_tensor_bus_colocated_is_accepted():
    cfg = load_config(None, ["bus.backend=tensor", "rollout.engine=sglang", "rollout.num_engines=2"])
    check_gpu_placement(cfg, world=2, local_world=2)  # engine i on trainer GPU i


def test_spawned_workers_keep_cuda_visibility(monkeypatch):
    from megatron_alp.runtime.spawn import child_environment

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in child_environment()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert child_environment()["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert child_environment({"CUDA_VISIBLE_DEVICES": ""})["CUDA_VISIBLE_DEVICES"] == ""  # explicit wins


def test_ipc_args_name_the_gpu_by_uuid():
    from rollout.bus.manifest import BusError
    from rollout.bus.tensor import device_from_uuid, with_device_uuid

    args = (torch.Tensor, (2,), (1,), 0, object, torch.float32, 3, b"handle")
    out = with_device_uuid(args, lambda i: f"GPU-uuid-{i}")
    assert out[6] == "GPU-uuid-3" and out[:6] == args[:6] and out[7:] == args[7:]
    assert with_device_uuid(out, lambda i: "never") == out  # already a UUID
    assert device_from_uuid("GPU-b", ["GPU-a", "GPU-b"]) == 1 and device_from_uuid(2, []) == 2
    with pytest.raises(BusError, match="does not see"):
        device_from_uuid("GPU-z", ["GPU-a"])


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _FakeDistOpt:
    """The attributes of Megatron's DistributedOptimizer that the loader walks."""

    def __init__(self, params):
        self.per_bucket_numel_unpadded = [[sum(p.numel() for p in params)]]
        starts = [0]
        for p in params[:-1]:
            starts.append(starts[-1] + p.numel())
        self.gbuf_ranges = [{torch.float32: [{"param_map": {
            p: {"gbuf_local": _Range(s, s + p.numel())} for p, s in zip(params, starts, strict=True)}}]}]
        self.set = {}

    def _set_main_param_and_optimizer_states(self, p, tensors):
        self.set[p] = tensors


def test_dp_reshardable_state_loads_without_a_padding_key():
    from megatron_alp.trainer.optim_state import load_dp_reshardable

    params = [torch.zeros(3), torch.zeros(2)]
    opt = _FakeDistOpt(params)
    # What get_parameter_state_dp_reshardable() writes: no 'padding' key (Megatron 0.16.1).
    saved = {"per_bucket_numel": [[5]], "per_bucket_numel_unpadded": [[5]], 0: {torch.float32: [[
        {"param": torch.ones(3), "exp_avg": torch.full((3,), 2.0), "gbuf_local_start": 0, "gbuf_local_end": 3},
        {"param": torch.ones(2), "exp_avg": torch.full((2,), 3.0), "gbuf_local_start": 3, "gbuf_local_end": 5},
    ]]}}
    load_dp_reshardable(opt, saved)
    assert set(opt.set[params[1]]) == {"param", "exp_avg"} and torch.equal(opt.set[params[1]]["exp_avg"],
                                                                           torch.full((2,), 3.0))
    saved[0][torch.float32][0][1]["gbuf_local_start"] = 4
    with pytest.raises(ValueError, match="shard range"):
        load_dp_reshardable(_FakeDistOpt(params), saved)
    saved["per_bucket_numel_unpadded"] = [[6]]
    with pytest.raises(ValueError, match="buckets"):
        load_dp_reshardable(_FakeDistOpt(params), saved)
