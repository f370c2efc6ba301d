"""Named reshape functions between HF tensors and Megatron's full (TP=1) tensors.

Each entry of :data:`RESHAPES` is a pair ``(to_megatron, to_hf)``: ``to_megatron(tensors, dims)``
takes the HF tensors of one rule (in the order the rule names them) and returns the one Megatron
full tensor; ``to_hf(tensor, dims)`` is its exact inverse (the round trip is bitwise: only views,
``cat`` and ``split``, no arithmetic). ``dims`` are the model's sizes (:class:`Dims`).

- ``copy``: the same tensor under another name (norms, ``o_proj`` / ``down_proj``).
- ``vocab``: the embedding / LM head. Megatron pads the vocabulary to a multiple of
  ``make_vocab_size_divisible_by x TP``; that padding belongs to the sharding map
  (:func:`megatron_alp.model.sharding.shard_of` zero-pads on load, ``gather_full`` strips on export),
  so the full form here has exactly ``vocab_size`` rows and this function only checks that.
- ``qkv``: GQA. HF keeps ``q_proj`` [heads*d, h], ``k_proj`` / ``v_proj`` [groups*d, h]; Megatron's
  fused ``linear_qkv`` is grouped per KV head: for each group g, its ``heads/groups`` query heads,
  then k_g, then v_g ([groups * (heads/groups + 2) * d, h]). TP splits that dim contiguously, so
  every rank gets whole groups. The same layout applies to the bias (Qwen2).
- ``gate_up``: SwiGLU. Megatron's ``linear_fc1`` is ``[gate; up]`` along dim 0 (TP then splits each
  half, ``partition_stride`` = 2, see the sharding map).

The layouts were learned from Megatron-Core's ``SelfAttention.get_query_key_value_tensors`` and
``MLP`` (and cross-checked with the Megatron-LM ``checkpoint/loader_llama_mistral.py`` converter and
Megatron-Bridge's ``QKVMapping`` / ``GatedMLPMapping``); the code is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Dims:
    """The sizes the reshapes (and the symbolic shapes of the name maps) need."""

    hidden: int
    ffn: int
    vocab: int
    heads: int
    groups: int
    head_dim: int

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.groups * self.head_dim

    def resolve(self, symbolic: Sequence[str]) -> Tuple[int, ...]:
        """``("q", "hidden")`` -> ``(heads*head_dim, hidden)``."""
        table = {"hidden": self.hidden, "ffn": self.ffn, "vocab": self.vocab, "q": self.q, "kv": self.kv,
                 "head_dim": self.head_dim}
        return tuple(table[s] for s in symbolic)

    @classmethod
    def of(cls, model_cfg) -> "Dims":
        """From a :class:`megatron_alp.config.schema.ModelConfig`."""
        groups = model_cfg.num_query_groups or model_cfg.num_attention_heads
        head_dim = model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_attention_heads
        return cls(hidden=model_cfg.hidden_size, ffn=model_cfg.ffn_hidden_size, vocab=model_cfg.vocab_size,
                   heads=model_cfg.num_attention_heads, groups=groups, head_dim=head_dim)


def _one(tensors: List[torch.Tensor]) -> torch.Tensor:
    if len(tensors) != 1:
        raise ValueError(f"expected 1 tensor, got {len(tensors)}")
    return tensors[0]


def copy_to_megatron(tensors: List[torch.Tensor], dims: Dims) -> torch.Tensor:
    return _one(tensors)


def copy_to_hf(tensor: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
    return [tensor]


def vocab_to_megatron(tensors: List[torch.Tensor], dims: Dims) -> torch.Tensor:
    t = _one(tensors)
    if t.shape[0] != dims.vocab:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, config.json says vocab_size = {dims.vocab}")
    return t


def vocab_to_hf(tensor: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
    # A tensor straight from a shard may still carry padded rows; the HF form never does.
    return [tensor[: dims.vocab] if tensor.shape[0] > dims.vocab else tensor]


def qkv_to_megatron(tensors: List[torch.Tensor], dims: Dims) -> torch.Tensor:
    """[q; k; v] (HF) -> per-group [q_g...; k_g; v_g] (Megatron). Works for weights and biases."""
    q, k, v = tensors
    rest = tuple(q.shape[1:])
    per_group = dims.heads // dims.groups
    q = q.reshape(dims.groups, per_group * dims.head_dim, *rest)
    k = k.reshape(dims.groups, dims.head_dim, *rest)
    v = v.reshape(dims.groups, dims.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(dims.groups * (per_group + 2) * dims.head_dim, *rest)


def qkv_to_hf(tensor: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
    rest = tuple(tensor.shape[1:])
    per_group = dims.heads // dims.groups
    grouped = tensor.reshape(dims.groups, (per_group + 2) * dims.head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * dims.head_dim, dims.head_dim, dims.head_dim], dim=1)
    return [q.reshape(dims.q, *rest).contiguous(), k.reshape(dims.kv, *rest).contiguous(),
            v.reshape(dims.kv, *rest).contiguous()]


def gate_up_to_megatron(tensors: List[torch.Tensor], dims: Dims) -> torch.Tensor:
    gate, up = tensors
    return torch.cat([gate, up], dim=0)


def gate_up_to_hf(tensor: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
    gate, up = torch.split(tensor, [dims.ffn, dims.ffn], dim=0)
    return [gate.contiguous(), up.contiguous()]


ToMegatron = Callable[[List[torch.Tensor], Dims], torch.Tensor]
ToHF = Callable[[torch.Tensor, Dims], List[torch.Tensor]]

RESHAPES: Dict[str, Tuple[ToMegatron, ToHF]] = {
    "copy": (copy_to_megatron, copy_to_hf),
    "vocab": (vocab_to_megatron, vocab_to_hf),
    "qkv": (qkv_to_megatron, qkv_to_hf),
    "gate_up": (gate_up_to_megatron, gate_up_to_hf),
}
