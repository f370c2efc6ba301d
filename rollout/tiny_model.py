"""A tiny random Qwen2 model and a char-level tokenizer, built locally (no download).

Tests, the benchmark and the CPU demo use it. The tokenizer is a real ``PreTrainedTokenizerFast``
(built with the ``tokenizers`` library: a byte-level BPE with no merges, so every ASCII character
is one token) with ChatML special tokens and a small chat template, saved next
to the model so ``AutoTokenizer.from_pretrained(path)`` and ``AutoModelForCausalLM`` both work.
"""

from __future__ import annotations

import logging
import os
import string
from typing import List, Optional

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

ALPHABETS = {
    # Everything printable: enough for chat templates, code blocks and math text.
    "full": "\n" + "".join(chr(c) for c in range(32, 127)),
    # Digits and the few symbols the synthetic tasks use: a small output space makes RL from a
    # random init learnable in minutes (see rollout/rewards/synthetic.py).
    "digits": string.digits + "+-=:, \ncrav",
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_to_unicode() -> dict:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def build_char_tokenizer(alphabet: str = "full"):
    """A char-level ``PreTrainedTokenizerFast``: ids 0..2 are the specials, then one id per char.

    It is a byte-level BPE with no merges (the layout of Qwen's own tokenizer), so whichever
    class ``AutoTokenizer`` picks for a ``qwen2`` checkpoint (transformers 5 rebuilds Qwen2's
    byte-level pipeline around the saved vocabulary) every ASCII character stays one token and
    decoding returns the text exactly.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ALPHABETS.get(alphabet, alphabet)
    chars = "".join(dict.fromkeys(chars))  # unique, order kept
    if any(ord(c) > 127 for c in chars):
        raise ValueError("build_char_tokenizer: the alphabet must be ASCII")
    to_unicode = _byte_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[to_unicode[ord(ch)]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str,
    *,
    alphabet: str = "full",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    init_std: float = 0.02,
) -> str:
    """Write a random ``Qwen2ForCausalLM`` (safetensors) and its tokenizer to ``out_dir``.

    The vocabulary is exactly the tokenizer's (no padding), so rollout engines and the trainer
    see the same ``vocab_size``. Returns ``out_dir``.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_char_tokenizer(alphabet)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("tiny Qwen2 (%d layers, hidden %d, vocab %d) written to %s",
                num_layers, hidden_size, config.vocab_size, out_dir)
    return out_dir


def eos_token_ids(tokenizer) -> List[int]:
    """Ids that end a response for this tokenizer (EOS and the ChatML end-of-turn when present)."""
    ids: List[Optional[int]] = [tokenizer.eos_token_id]
    if IM_END in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    return sorted({i for i in ids if i is not None})
