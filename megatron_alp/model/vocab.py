"""Vocabulary padding, as Megatron does it.

Megatron pads the embedding and output layer to a multiple of ``make_vocab_size_divisible_by x TP``
so each TP rank holds an equal, aligned shard. The padded rows exist only in the trainer: rollout
engines and HF checkpoints have the real vocabulary, so the real size is kept in
``model.vocab_size`` and the padded logits are excluded from every softmax
(``vocab_parallel_logprobs(..., vocab_size=...)``) and stripped on export.
"""

from __future__ import annotations


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Smallest multiple of ``divisible_by * tp`` that is >= ``vocab_size``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    multiple = max(1, divisible_by) * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple
