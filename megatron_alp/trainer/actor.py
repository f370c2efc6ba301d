"""The actor: forward/backward over micro-batches with Megatron's schedule, the objective, the step.

Data layout (:class:`~.batch.RLBatch`): every per-token array is ``[N, L]`` aligned with ``tokens``; entry
``[i, t]`` concerns token ``t`` (predicted from positions ``< t``), so position 0 never counts.
Sequences are right-padded to one length per mini-batch (rounded up to a multiple of TP when
sequence parallelism is on, and of 16 more under FP8; ``batching.seq_pad_multiple``): Megatron's
pipeline schedule sends fixed-shape activations between stages, and padding keeps the TP/SP/PP
paths identical. Padding is masked out of every loss and
metric.

Loss scaling: the objective is aggregated with *global* normalisers (tokens or sequences summed
over the whole mini-batch and all DP ranks), so the sum over micro-batches and DP ranks is the
full-batch loss; Megatron divides each micro-batch's loss by the number of micro-batches and DDP
averages over DP, so each micro-batch's loss is multiplied by ``num_micro x dp`` to undo both.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..algo.metrics import compute_metrics
from ..algo.objectives import aggregate, effective_mask, kl_penalty, normalizer_count, token_losses
from ..model.alp import alp_forward, token_codes
from ..model.specs import packing_mode
from ..ops.logprob import vocab_parallel_logprobs
from ..runtime.device import any_rank, collective_tensor, to_device
from .batch import RLBatch
from .packing import PackedMicroBatch, make_packs, packed_rows, packed_seq_params, packs_needed, sample_lengths

logger = logging.getLogger(__name__)


class Actor:
    """Owns the model chunks, the optimizer and the forward/backward logic of one trainer rank."""

    def __init__(self, algorithm, run, alp, model_chunks: List, optimizer=None, *, vocab_size: int,
                 temperature: float = 1.0, pad_multiple: int = 1):
        """``algorithm``, ``run``, ``alp``: the config sections; ``vocab_size``: the model's true
        vocabulary (padding excluded); ``temperature``: the rollout's sampling temperature;
        ``pad_multiple``: what packed sequences are padded to (trainer.batching.seq_pad_multiple)."""
        from megatron.core import parallel_state as ps

        self.chunks = model_chunks
        self.optimizer = optimizer
        self.ps = ps
        self.algo = algorithm
        self.micro_batch_size = run.micro_batch_size
        self.perturb = alp.enabled
        self.hparams = algorithm.objective_hparams()
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.max_tokens = run.max_tokens_per_micro_batch  # packing budget (0: padded micro-batches)
        self.pad_multiple = pad_multiple  # sequence padding multiple (TP under SP, x16 under FP8)
        self._packing = packing_mode(model_chunks)  # how a pack reaches the attention: thd, rows or mask

    # -- helpers --------------------------------------------------------------------------------

    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_pipeline_last_stage()

    def _micro_batches(self, batch: RLBatch) -> List:
        """Padded micro-batches of ``run.micro_batch_size`` rows, or packed ones under the token
        budget (``run.max_tokens_per_micro_batch``; trainer/packing.py), as many on every DP rank."""
        if self.max_tokens > 0:
            dp = self.ps.get_data_parallel_group()
            count = collective_tensor([packs_needed(batch, self.max_tokens)], dtype=torch.int64, group=dp)
            _dp_all_reduce(count, dp, op=dist.ReduceOp.MAX)
            return make_packs(batch, self.max_tokens, int(count), pad_multiple=self.pad_multiple)
        mbs = self.micro_batch_size
        return [batch.select(slice(i, i + mbs)) for i in range(0, len(batch), mbs)]

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool):
        """Per-token log-probs [b, s] aligned with ``tokens`` (position 0 = 0)."""
        target = torch.roll(tokens, shifts=-1, dims=1)
        out = vocab_parallel_logprobs(
            logits, target, tp_group=self.ps.get_tensor_model_parallel_group(), temperature=self.temperature,
            with_entropy=with_entropy, vocab_size=self.vocab_size,
        )
        lp, ent = out if with_entropy else (out, None)

        def shift(x):
            return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

        return shift(lp), (shift(ent) if ent is not None else None)

    def _run_schedule(self, micro: List[RLBatch], forward_only: bool, loss_fn, perturb_step: Optional[int]):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq_len = micro[0].tokens.shape[1]
        it = iter(list(enumerate(micro)))

        def forward_step(data_iterator, model):
            i, mb = next(data_iterator)
            tokens = mb.tokens
            kwargs = {}
            if isinstance(mb, PackedMicroBatch):  # packs are laid out on the CPU
                tokens = tokens.to(mb.rows.tokens.device)
                pos = mb.positions.to(tokens.device)
                if self._packing == "thd":
                    kwargs["packed_seq_params"] = packed_seq_params(mb, tokens.device)
                    mask = None
                elif self._packing == "rows":
                    mask = packed_rows(mb, tokens.device)
                else:
                    mask = mb.attention_mask().to(tokens.device)
            else:
                pos = torch.arange(seq_len, device=tokens.device)[None].expand(tokens.shape[0], -1)
                mask = None
            ctx = alp_forward(perturb_step, i, _token_codes(mb)) if perturb_step is not None else \
                contextlib.nullcontext()
            with ctx:
                output = model(tokens, pos, mask, **kwargs)
            return output, (lambda out, mb=mb: loss_fn(out, mb))

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=it, model=self.chunks, num_microbatches=len(micro),
            seq_length=seq_len, micro_batch_size=len(micro[0]), forward_only=forward_only,
        )

    # -- no-grad forwards (pi_old, reference, diagnostics): never perturbed ----------------------

    @torch.no_grad()
    def compute_logprobs(self, batch: RLBatch) -> Optional[torch.Tensor]:
        """Unperturbed log-probs [N, L] of ``batch`` (on the last pipeline stage; None elsewhere)."""
        batch = to_device(batch)  # the rollout batch is built on the CPU; the weights may be on a GPU
        for c in self.chunks:
            c.eval()
        out: List[torch.Tensor] = []

        def loss_fn(logits, mb):
            lp, _ = self._logprobs(logits, mb.tokens, with_entropy=False)
            out.append(mb.unpack(lp.detach()) if isinstance(mb, PackedMicroBatch) else lp.detach())
            return logits.new_zeros(()), {}

        micro = self._micro_batches(batch)
        self._run_schedule(micro, forward_only=True, loss_fn=loss_fn, perturb_step=None)
        for c in self.chunks:
            c.train()
        if not self.is_last_stage:
            return None
        if micro and isinstance(micro[0], PackedMicroBatch):  # back to the batch's row order
            full = torch.zeros(batch.tokens.shape, dtype=out[0].dtype, device=out[0].device)
            for mb, lp in zip(micro, out, strict=True):
                if not mb.dummy:
                    full[mb.index, :lp.shape[1]] = lp
            return full
        return torch.cat(out)

    # -- the policy update ----------------------------------------------------------------------

    def _global_normalizer(self, batch: RLBatch) -> torch.Tensor:
        m = effective_mask(self.algo.objective, batch.loss_mask, batch.rollout_logp, batch.rollout_logp,
                           batch.advantages, batch.old_logp)
        n = normalizer_count(m, self.algo.aggregation)
        _dp_all_reduce(n, self.ps.get_data_parallel_group())
        return n

    def train_step(self, batch: RLBatch, step: int, record: Optional[List[dict]] = None,
                   fill_from_forward: Sequence[str] = ()) -> Dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch; returns this update's scalars
        (loss, gradient norm, learning rates, skip flags). On the last pipeline stage the detached
        per-token tensors of the update are appended to ``record`` (when given) for
        :meth:`step_metrics`, which computes the token metrics once over all updates of the step.

        ``fill_from_forward`` (``old_logp``, ``base_logp``): batch fields set to this forward's
        detached log-probs before the loss uses them, instead of a separate no-grad pass
        (trainer/updates.py: only for the first update of a rollout, unperturbed, where the
        weights are pi_old's)."""
        if fill_from_forward and self.perturb:
            raise ValueError("the perturbed (ALP) forward cannot stand in for pi_old's unperturbed log-probs")
        batch = to_device(batch)  # the rollout batch is built on the CPU; the weights may be on a GPU
        micro = self._micro_batches(batch)
        normalizer = self._global_normalizer(batch)
        scale = len(micro) * self.ps.get_data_parallel_world_size()
        perturb = step if self.perturb else None
        stash: List[dict] = []
        want_entropy = True  # entropy is logged every step (policy/entropy), not only when it is in the loss

        def loss_fn(logits, mb):
            lp, ent = self._logprobs(logits, mb.tokens, with_entropy=want_entropy)
            packed = mb if isinstance(mb, PackedMicroBatch) else None
            if packed is not None:  # per-token values back to the samples' rows (trainer/packing.py)
                lp, ent = packed.unpack(lp), (packed.unpack(ent) if ent is not None else None)
                mb = packed.rows
            for name in fill_from_forward:  # pi_old = this forward's weights (first update, no noise)
                setattr(mb, name, lp.detach())
            loss = self._loss(lp, ent, mb, normalizer)
            if packed is None or not packed.dummy:
                stash.append({"lp": lp.detach(), "ent": ent.detach() if ent is not None else None, "mb": mb,
                              "loss": loss.detach().clone()})
            return loss * scale, {}

        self.optimizer.zero_grad()
        # Megatron's finalize_model_grads (set on the config by optim.wrap_ddp) runs at the end of
        # the schedule: DP reduction, SP/QK-norm TP reduction, tied-embedding reduction across PP.
        self._run_schedule(micro, forward_only=False, loss_fn=loss_fn, perturb_step=perturb)
        loss_sum = torch.stack([s["loss"] for s in stash]).sum() if stash else torch.zeros(())
        if record is not None and self.is_last_stage and stash:
            record.append({"lp": [s["lp"] for s in stash], "ent": [s["ent"] for s in stash],
                           "mb": [s["mb"] for s in stash]})
        if any_rank(not bool(torch.isfinite(loss_sum))):  # every rank skips together
            self.optimizer.zero_grad()
            return {"train/nonfinite_loss": 1.0, "train/skipped_step": 1.0}
        # A non-finite gradient (NaN logits whose tokens the objective dropped, an fp16 overflow)
        # skips the step inside Optimizer.step; an fp16 overflow step reports no norm (None).
        ok, grad_norm = self.optimizer.step()
        metrics = self._update_metrics(ok, grad_norm, batch, micro)
        if self.is_last_stage and stash:
            total = loss_sum.clone().to(torch.float64)
            _dp_all_reduce(total, self.ps.get_data_parallel_group())
            metrics["train/loss"] = float(total)
        return metrics

    def _loss(self, lp: torch.Tensor, ent: Optional[torch.Tensor], mb: RLBatch, normalizer) -> torch.Tensor:
        """One micro-batch's loss: the objective's per-token losses, plus the KL penalty against
        the reference, minus the entropy bonus, each aggregated as ``algorithm.aggregation`` says."""
        algo = self.algo

        def agg(per_token):
            return aggregate(per_token, mb.loss_mask, algo.aggregation, horizon=algo.horizon, normalizer=normalizer)

        loss = agg(token_losses(algo.objective, lp, mb.rollout_logp, mb.advantages, mb.loss_mask,
                                old_logp=mb.old_logp, **self.hparams))
        if algo.kl_coef > 0 and mb.ref_logp is not None:
            loss = loss + algo.kl_coef * agg(kl_penalty(lp, mb.ref_logp, mb.loss_mask, algo.kl_estimator))
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * agg(ent)
        return loss

    def _update_metrics(self, ok: bool, grad_norm, batch: RLBatch, micro) -> Dict[str, float]:
        """An optimizer step's scalars: gradient norm, skip flags, loss scale, learning rates, and
        the share of this rank's forward positions that are padding (each sample counted up to its
        last loss token, as packing lays it out: what packing saves)."""
        norm = math.nan if grad_norm is None else float(grad_norm)
        metrics: Dict[str, float] = {"train/grad_norm": norm, "train/skipped_step": 0.0 if ok else 1.0,
                                     "train/nonfinite_loss": 0.0,
                                     "train/nonfinite_grad": 0.0 if math.isfinite(norm) else 1.0}
        metrics.update(self.optimizer.scale_metrics())
        for i, lr in enumerate(self.optimizer.lrs()):
            metrics[f"train/lr_group{i}"] = lr
        positions = sum(mb.tokens.numel() for mb in micro)
        metrics["perf/padding_frac"] = 1.0 - sum(sample_lengths(batch)) / max(positions, 1)
        metrics["perf/micro_batches"] = float(len(micro))
        return metrics

    def step_metrics(self, record: List[dict]) -> Dict[str, object]:
        """Token metrics of one RL step from the ``record`` that :meth:`train_step` filled: computed
        once over every token of every update on every DP rank (exact quantiles, summed counts,
        token-weighted means), plus ``ratio/k*_first_update`` (pi vs mu on the first update alone:
        before any optimizer step of this rollout, so mismatch plus ALP's perturbation). Collective
        over the data-parallel group on the last pipeline stage; empty dict elsewhere."""
        if not (self.is_last_stage and record):
            return {}
        dp = self.ps.get_data_parallel_group()
        out = self._compute(record, dp)
        first = self._compute(record[:1], dp, objective_internals=False)
        for k in ("k1", "k2", "k3"):
            out[f"ratio/{k}_first_update"] = first[f"ratio/{k}"]
        return {k: (v.tolist() if v.dim() else float(v)) for k, v in out.items()}

    def _compute(self, record: List[dict], dp, objective_internals: bool = True) -> Dict[str, torch.Tensor]:
        lps = [lp for r in record for lp in r["lp"]]
        mbs = [mb for r in record for mb in r["mb"]]
        L = max(p.shape[1] for p in lps)

        def cat(parts):
            if any(p is None for p in parts):
                return None
            return torch.cat([torch.nn.functional.pad(p, (0, L - p.shape[1])) for p in parts])

        def mb_cat(name):
            return cat([getattr(mb, name) for mb in mbs])

        hp = dict(objective=self.algo.objective, hparams=self.hparams) if objective_internals else {}
        return compute_metrics(
            cat(lps), mb_cat("rollout_logp"), mb_cat("loss_mask"), old_logp=mb_cat("old_logp"),
            base_logp=mb_cat("base_logp"), advantages=torch.cat([mb.advantages for mb in mbs]),
            entropy=cat([e for r in record for e in r["ent"]]), dppo_delta=self.algo.dppo_delta, group=dp, **hp,
        )


def _dp_all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    """In-place all-reduce over the data-parallel group; nothing to do (no call) when it has one rank."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _token_codes(mb) -> torch.Tensor:
    """[b, s] identities of the micro-batch's tokens (sample id, index in the sample) for ALP's noise,
    so a token is perturbed alike padded or packed, in any micro-batch, on any DP rank. A batch
    without ``sample_ids`` uses its row numbers (then the identity is only local to this batch)."""
    if isinstance(mb, PackedMicroBatch):
        used = sum(mb.lengths)
        ids = torch.repeat_interleave(_sample_ids(mb.rows).cpu(), torch.tensor(mb.lengths))
        codes = torch.full(mb.tokens.shape, -1, dtype=torch.int64)  # the end padding: never counted
        codes[0, :used] = token_codes(ids, mb.positions[0, :used].cpu())
        return codes
    n, L = mb.tokens.shape
    return token_codes(_sample_ids(mb)[:, None].expand(n, L), torch.arange(L)[None].expand(n, L))


def _sample_ids(batch) -> torch.Tensor:
    return batch.sample_ids if batch.sample_ids is not None else torch.arange(len(batch))
