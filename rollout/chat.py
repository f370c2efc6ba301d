"""Facts about a tokenizer's chat template that the rollout needs."""

from __future__ import annotations

from typing import List, Optional

# End-of-turn markers of the common templates: ChatML (Qwen), Llama-3, Gemma.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def end_of_turn_token(tokenizer) -> Optional[str]:
    """The special token that closes an assistant turn in ``tokenizer``'s chat template, or None."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        return None
    for name in END_OF_TURN_TOKENS:
        if name in template:
            return name
    return None


def stop_token_ids(tokenizer) -> List[int]:
    """End-of-turn and EOS ids of ``tokenizer`` (what a preset's rollout.stop_token_ids should hold)."""
    ids = []
    name = end_of_turn_token(tokenizer)
    if name is not None:
        ids.append(tokenizer.convert_tokens_to_ids(name))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
