"""The prompts a fault-free run trains, from its driver's prompt stream instead of a second run."""

from __future__ import annotations


def stream_prompts(config: str, overrides, steps: int, per_step: int):
    """[(step, group_id, prompt_index)] that a run of ``config`` + ``overrides`` trains in ``steps``
    steps of ``per_step`` prompts when nothing goes wrong: the driver's prompt stream (same data,
    tokenizer and seed, trainer/driver.py) drawn in order, step s's group g being its
    (s x per_step + g)-th prompt. The asynchronous producer draws each target step's prompts in
    order from that stream, and a re-issued or regenerated group keeps its prompt (rollout/producer.py)."""
    from transformers import AutoTokenizer

    from megatron_alp.config import load_config
    from rollout.data import PromptStream, load_prompts

    cfg = load_config(config, [o for o in overrides if "=" in o])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    stream = PromptStream(load_prompts(cfg.rollout.data, tokenizer), seed=cfg.run.seed)
    return sorted((s, g, p.index) for s in range(steps) for g, p in enumerate(stream.next_batch(per_step)))
