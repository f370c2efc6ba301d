"""Step-level metrics: merge the per-update scalars of one step and collect them on rank 0."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from ..algo.metrics import reduction_of
from ..model.alp import is_alp_param


def merge_updates(per_update: List[Dict]) -> Dict:
    """One value per metric over the step's mini-batch updates, by the metric's rule
    (:func:`megatron_alp.algo.metrics.reduction_of`, the only place rules live): counts summed,
    extremes by min / max, samples concatenated, the rest (loss, gradient norm, learning rate)
    averaged over the updates with a finite value. Quantiles cannot be merged from per-update
    values: they are computed once over the whole step (:meth:`Actor.step_metrics`)."""
    keys = sorted({k for m in per_update for k in m})
    out: Dict = {}
    for k in keys:
        vals = [m[k] for m in per_update if k in m]
        rule = reduction_of(k)
        if rule == "quantile":
            raise ValueError(f"metric {k!r} is a quantile: compute it over the whole step, not per update")
        if rule == "samples" or isinstance(vals[0], list):
            out[k] = [x for v in vals for x in v]
        elif rule == "sum":
            out[k] = float(sum(vals))
        elif rule in ("min", "max"):
            out[k] = (min if rule == "min" else max)(vals)
        else:
            finite = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
            out[k] = sum(finite) / len(finite) if finite else math.nan
    return out


def merge_step_metrics(per_update: List[Dict], step_level: Dict, src_rank: int) -> Dict:
    """The merged per-update scalars and the step-level token metrics of the rank that holds them
    (``src_rank``: the last pipeline stage's first rank), delivered to every rank."""
    if dist.get_rank() == src_rank:
        merged = merge_updates(per_update)
        merged.update(step_level)
    box = [merged if dist.get_rank() == src_rank else None]
    dist.broadcast_object_list(box, src=src_rank)
    return box[0]


def sigma_metrics(model, ddp) -> Dict:
    """ALP's sigma per layer (every pipeline stage's), their stats and histogram, the gradient norm."""
    from ..model.sharding import named_global_parameters

    mine = {}
    for name, p in named_global_parameters(model):  # global layer numbers: stages do not collide
        if is_alp_param(name, p):
            g = getattr(p, "main_grad", None)
            g = g if g is not None else p.grad
            # Only a rank holding the DP-reduced gradient reports it (the distributed optimizer
            # reduce-scatters: other DP ranks keep their local, unreduced gradient; optim.py).
            reduced = getattr(p, "grad_reduced_here", True)
            gn = (float(g.float().norm()) if g is not None else 0.0) if reduced else None
            mine[name] = (float(p.detach().float().exp()), gn)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {}
    for d in everyone:
        for k, v in d.items():
            if k not in merged or merged[k][1] is None:
                merged[k] = v
    if not merged:
        return {}
    sig = torch.tensor([v[0] for v in merged.values()], dtype=torch.float64)
    out = {"alp/sigma_mean": sig.mean().item(), "alp/sigma_min": sig.min().item(), "alp/sigma_max": sig.max().item(),
           "alp/sigma_hist": sig.tolist(),
           "alp/sigma_grad_norm": math.sqrt(sum((v[1] or 0.0) ** 2 for v in merged.values()))}
    for name, (s, _) in merged.items():
        out[f"alp/sigma/{name.replace('.perturbation.log_sigma', '')}"] = s
    return out


def metrics_rank(layout) -> int:
    """Global rank of the last pipeline stage's (TP 0, DP 0) rank, which holds the reduced metrics.

    Megatron's default rank order (tp-cp-ep-dp-pp) puts the pipeline dimension outermost, so that
    rank is the first one of the last stage's block of world / pp ranks.
    """
    return (layout.pp - 1) * (layout.world_size // layout.pp)


class StepClock:
    """Wall-clock phases of one RL step, for the ``perf/`` metrics."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def perf_metrics(self, train_tokens: float) -> Dict[str, float]:
        train_s = self.seconds.get("train", 0.0)
        return {"perf/train_s": train_s, "perf/sync_s": self.seconds.get("sync", 0.0),
                "perf/train_tokens_per_s": train_tokens / max(train_s, 1e-9),
                "perf/step_seconds": time.perf_counter() - self.start}


def step_metrics(trainer, per_update: List[Dict], step_level: Dict, driver_side: Dict, clock: StepClock,
                 train_tokens: float, **loop: float) -> Dict:
    """Collective: the metrics of one RL step, complete on rank 0 (the trainer's part elsewhere).

    The last pipeline stage's merged update metrics and step-level token metrics
    (:meth:`Actor.step_metrics`) and every stage's sigma, plus on rank 0 the
    driver's side (``rollout/``, ``bus/``), the clock's ``perf/`` and the loop's own ``train/<key>``.
    """
    metrics = merge_step_metrics(per_update, step_level, src_rank=metrics_rank(trainer.layout))
    metrics.update(sigma_metrics(trainer.model, trainer.ddp))
    if dist.get_rank() == 0:
        metrics.update(driver_side)
        metrics.update(clock.perf_metrics(train_tokens))
        metrics.update({f"train/{k}": v for k, v in loop.items()})
    return metrics
