"""A brief supervised warm start of the demo's tiny model on the synthetic task.

A random tiny model almost never produces a right digit followed by EOS, so RL would start from
a reward near zero. A few dozen supervised steps on (prompt, answer + EOS) pairs give it a
partial skill: RL then has reward variance inside each group from the first step and visibly
raises the mean reward. Plain transformers + torch: this runs before any Megatron process.
"""

from __future__ import annotations

import logging
import random
from typing import List, Tuple

import torch

logger = logging.getLogger(__name__)


def warm_start(hf_dir: str, out_dir: str, records: List[dict], steps: int = 60, batch_size: int = 32,
               lr: float = 1e-3, seed: int = 0) -> float:
    """Fine-tune ``hf_dir`` on ``records`` ({"prompt", "answer"}) and save to ``out_dir``.

    Returns the final training loss. Loss only on the answer and EOS tokens.
    """
    from transformers import AutoTokenizer

    from rollout.tiny_model import eos_token_ids

    tok = AutoTokenizer.from_pretrained(hf_dir)
    eos = eos_token_ids(tok)[0]
    examples = []
    for r in records:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [eos]
        examples.append((p + a, [0] * len(p) + [1] * len(a)))
    return fit_sequences(hf_dir, out_dir, examples, steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def fit_sequences(hf_dir: str, out_dir: str, examples: List[Tuple[List[int], List[int]]], steps: int = 60,
                  batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> float:
    """Fine-tune ``hf_dir`` on (token ids, loss mask) pairs (loss where the mask is 1); save to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.tiny_model import eos_token_ids

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.train()
    eos = eos_token_ids(tok)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_v = float("nan")
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        L = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, L), eos, dtype=torch.long)
        labels = torch.full((batch_size, L), -100, dtype=torch.long)
        attn = torch.zeros(batch_size, L, dtype=torch.long)
        for i, (seq, mask) in enumerate(batch):
            t = torch.tensor(seq)
            ids[i, :len(seq)] = t
            labels[i, :len(seq)] = torch.where(torch.tensor(mask, dtype=torch.bool), t, -100)
            attn[i, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if step % 20 == 0 or step == steps - 1:
            logger.info("warm start %d/%d  loss %.3f", step + 1, steps, loss_v)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(hf_dir).save_pretrained(out_dir)
    except OSError:
        pass
    return loss_v
