"""``--verify``: the Megatron model and transformers give the same logits and log-probs.

Both sides run in fp32 (this checks the weight mapping, not a precision): a fresh Megatron chunk
of the current layout loads the Megatron checkpoint, runs the prompts through Megatron's
forward schedule (pipeline aware), and the last stage gathers the vocab-parallel logits; one rank
loads the HF directory with ``AutoModelForCausalLM`` and compares. A wrong mapping gives O(1)
differences; fp32 round-off on a tiny model is ~1e-6, on a 7B model ~1e-3 in log-prob units.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Question: what is 12 * 7? Answer:",
)


def prompt_ids(hf_dir: str, vocab_size: int, long_len: int = 256, max_len: int = 64) -> List[List[int]]:
    """Token ids of a few prompts: the checkpoint's tokenizer on short texts when it has one (else
    random ids), plus one ``long_len``-token random prompt, where a RoPE mistake shows most."""
    g = torch.Generator().manual_seed(0)
    long = [torch.randint(0, vocab_size, (long_len,), generator=g).tolist()] if long_len > 1 else []
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir)
        ids = [tok(p)["input_ids"][:max_len] for p in PROMPTS]
        if all(len(i) >= 2 and max(i) < vocab_size for i in ids):
            return ids + long
    except Exception as e:  # noqa: BLE001 - no / unusable tokenizer: fall back to random ids
        logger.info("verify: no usable tokenizer in %s (%s); using random token ids", hf_dir, type(e).__name__)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (7, 16, 31)] + long


@torch.no_grad()
def megatron_logits(model, ids: List[int], vocab_size: int) -> Optional[torch.Tensor]:
    """[s, vocab_size] fp32 logits of one prompt on last-stage ranks (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    pos = torch.arange(len(ids), device=device)[None]
    out: Dict[str, torch.Tensor] = {}

    def step(data_iter, m):
        next(data_iter)
        logits = m(tokens, pos, None)

        def loss_func(x):
            group = ps.get_tensor_model_parallel_group()
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, x.contiguous(), group=group)
            out["logits"] = torch.cat(parts, dim=-1)[0, :, :vocab_size].float()
            return x.new_zeros(()), {}

        return logits, loss_func

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=len(ids), micro_batch_size=1, forward_only=True,
    )
    return out.get("logits")


def _hf_logits(hf_dir: str, prompts: List[List[int]]) -> List[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return [hf(torch.tensor([ids])).logits[0].float() for ids in prompts]


def compare(ours: List[torch.Tensor], theirs: List[torch.Tensor], prompts: List[List[int]]) -> Dict[str, float]:
    """Max abs differences of logits, full log-softmax, and the prompt tokens' log-probs."""
    d_logits = d_lsm = d_tok = 0.0
    for a, b, ids in zip(ours, theirs, prompts, strict=True):
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        nxt = torch.tensor(ids[1:])[:, None]
        d_logits = max(d_logits, (a - b).abs().max().item())
        d_lsm = max(d_lsm, (la - lb).abs().max().item())
        d_tok = max(d_tok, (la[:-1].gather(1, nxt) - lb[:-1].gather(1, nxt)).abs().max().item())
    return {"max_abs_logits": d_logits, "max_abs_logprobs": d_lsm, "max_abs_token_logprobs": d_tok}


def verify(mcore_dir: str, hf_dir: str, tp: int = 1, pp: int = 1, tol: float = 1e-2) -> Dict[str, Any]:
    """Compare a Megatron checkpoint (loaded at TP x PP, fp32) with an HF directory (collective).

    Returns the same report on every rank: the max abs differences, the tolerance (applied to
    logits and log-probs) and ``ok``.
    """
    from megatron.core import parallel_state as ps

    from .mcore_ckpt import load_megatron_checkpoint, model_config_from_meta, read_meta
    from .pipeline import build_for_conversion

    model_cfg = model_config_from_meta(read_meta(mcore_dir))
    model = build_for_conversion(model_cfg, tp, pp, torch.float32)
    load_megatron_checkpoint(model, mcore_dir)
    model.eval()
    long_len = min(256, model_cfg.max_position_embeddings)
    box = [prompt_ids(hf_dir, model_cfg.vocab_size, long_len) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prompts = box[0]
    ours = [megatron_logits(model, ids, model_cfg.vocab_size) for ids in prompts]
    del model
    reporter = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
    report = None
    if reporter:
        report = compare(ours, _hf_logits(hf_dir, prompts), prompts)
        report.update(tol=tol, prompts=len(prompts), tokens=sum(len(p) for p in prompts))
        report["ok"] = max(report["max_abs_logits"], report["max_abs_logprobs"]) <= tol
    reports: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    report = next(r for r in reports if r is not None)
    logger.info("verify %s vs %s: %s", mcore_dir, hf_dir, report)
    return report
