"""GPU-only: one actor update in bf16 and fp16 (Megatron's mixed-precision optimizer with loss
scaling) and with ALP on; skipped without CUDA (CI and the dev machines have none)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI and dev machines have none)")


def _world(rank, world_size, dtype):
    from megatron_alp.model.alp import alp_block_spec
    from megatron_alp.trainer.batch import RLBatch
    from megatron_alp.trainer.optim import Optimizer, wrap_ddp
    from megatron_alp.trainer.setup import make_actor
    from tests.distributed.layouts import V, build, make_cfg

    cfg = make_cfg(extra=[f"precision.train={dtype}", "alp.enabled=true", "run.micro_batch_size=2",
                          "optimizer.lr=1e-4"])
    model = build(cfg, block_spec=lambda c, cc: alp_block_spec(c.model, c.alp, cc))
    ddp = wrap_ddp(model)
    actor = make_actor(cfg, [ddp], Optimizer([ddp], cfg.optimizer, precision=dtype, alp=cfg.alp))
    g = torch.Generator().manual_seed(0)
    batch = RLBatch(tokens=torch.randint(0, V, (4, 16), generator=g).cuda(), loss_mask=torch.ones(4, 16).cuda(),
                    rollout_logp=(-torch.rand(4, 16, generator=g) - 1).cuda(), advantages=torch.randn(4, generator=g).cuda())
    batch.loss_mask[:, 0] = 0
    sig = [p.dtype for n, p in model.named_parameters() if n.endswith("log_sigma")]
    m = actor.train_step(batch, step=0)
    return m, [str(s) for s in sig]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_update(dtype):
    from megatron_alp.runtime.spawn import run_world

    metrics, sigma_dtypes = run_world(_world, 1, args=(dtype,), timeout=300)[0]
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])
    assert set(sigma_dtypes) == {"torch.float32"}, "sigma must stay fp32 under half-precision training"
