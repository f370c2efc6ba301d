"""One model's weight map: Megatron full names <-> HF names, per parameter, in both directions.

:class:`WeightMap` instantiates a family's declarative rules (``families.py``) for one model
(its layer count, tied embeddings, QKV bias, QK-norm). It is the per-parameter API the converter
and the checkpoint-bus export share:

- :meth:`WeightMap.megatron_to_hf` ``(full_name, tensor) -> [(hf_name, tensor), ...]``
  (``[]`` for tensors HF does not store: ALP's sigma, the tied output layer);
- :meth:`WeightMap.hf_to_megatron` ``(full_name, {hf_name: tensor}) -> tensor``, checking every
  HF shape against the config first;
- :meth:`WeightMap.hf_names` lists what each Megatron tensor is made of (for streaming reads).

Full names are those of :mod:`megatron_alp.model.sharding` (TP=1, real vocabulary, global layer
indices); sharding itself stays there.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..model.alp.params import is_alp_param
from .families import TE_ALIASES, Family, Rule, get_family
from .reshape import RESHAPES, Dims

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


class ShapeMismatchError(ValueError):
    """An HF tensor whose shape disagrees with config.json."""


def canonical_name(full_name: str) -> str:
    """Megatron full name with Transformer Engine's fused-norm names mapped to the local spec's."""
    m = _LAYER.match(full_name)
    if m and m.group(2) in TE_ALIASES:
        return f"decoder.layers.{m.group(1)}.{TE_ALIASES[m.group(2)]}"
    return full_name


class WeightMap:
    """The name map of one model (family rules + ModelConfig)."""

    def __init__(self, family: Family, model) -> None:
        self.family = family
        self.model = model
        self.dims = Dims.of(model)
        self.num_layers = model.num_layers
        on = {"untied": not model.tie_embeddings, "qkv_bias": model.qkv_bias, "qk_layernorm": model.qk_layernorm}
        self.rules: List[Rule] = [r for r in family.rules if r.when is None or on[r.when]]
        self._by_pattern: Dict[str, Rule] = {r.mcore: r for r in self.rules}
        unknown = [r.reshape for r in self.rules if r.reshape not in RESHAPES]
        if unknown:
            raise KeyError(f"family {family.model_type}: unknown reshape(s) {unknown}")

    @classmethod
    def for_model(cls, model_type: str, model) -> "WeightMap":
        return cls(get_family(model_type), model)

    # -- names -------------------------------------------------------------------------------
    def _rule(self, full_name: str) -> Tuple[Rule, Optional[int]]:
        name = canonical_name(full_name)
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else None
        pattern = f"decoder.layers.{{i}}.{m.group(2)}" if m else name
        rule = self._by_pattern.get(pattern)
        if rule is None:
            raise KeyError(f"{full_name}: no {self.family.model_type} rule maps this Megatron tensor to HF")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise KeyError(f"{full_name}: layer {layer} out of range (model has {self.num_layers} layers)")
        return rule, layer

    def megatron_names(self, layers: Optional[Iterable[int]] = None, first_stage: bool = True,
                       last_stage: bool = True) -> List[str]:
        """Full Megatron names in checkpoint order, for these global layers and stage ends."""
        layers = range(self.num_layers) if layers is None else layers
        out = []
        if first_stage:
            out += [r.mcore for r in self.rules if not r.per_layer and r.mcore.startswith("embedding.")]
        for i in layers:
            out += [r.mcore.format(i=i) for r in self.rules if r.per_layer]
        if last_stage:
            out += [r.mcore for r in self.rules if not r.per_layer and not r.mcore.startswith("embedding.")]
        return out

    def hf_names(self, full_name: str) -> List[str]:
        """HF tensors the Megatron tensor ``full_name`` is made of."""
        rule, layer = self._rule(full_name)
        return [n.format(i=layer) for n, _ in rule.hf]

    def all_hf_names(self) -> List[str]:
        return [h for n in self.megatron_names() for h in self.hf_names(n)]

    def is_ignored_hf(self, hf_name: str) -> bool:
        """HF tensors that carry no weights, or the LM head a tied checkpoint stores anyway."""
        if any(hf_name.endswith(s) for s in self.family.ignored_hf):
            return True
        return self.model.tie_embeddings and hf_name == "lm_head.weight"

    # -- shapes ------------------------------------------------------------------------------
    def check_hf_shape(self, hf_name: str, shape: Tuple[int, ...], symbolic: Tuple[str, ...]) -> None:
        want = self.dims.resolve(symbolic)
        if tuple(shape) != want:
            raise ShapeMismatchError(
                f"shape mismatch for {hf_name}: checkpoint has {tuple(shape)}, "
                f"config.json implies {want} ({' x '.join(symbolic)})"
            )

    def hf_shapes(self) -> Dict[str, Tuple[str, ...]]:
        """{HF name: symbolic shape} of every tensor the model is made of."""
        out = {}
        for name in self.megatron_names():
            rule, layer = self._rule(name)
            out.update({pattern.format(i=layer): symbolic for pattern, symbolic in rule.hf})
        return out

    # -- tensors -----------------------------------------------------------------------------
    def hf_to_megatron(self, full_name: str, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The Megatron full tensor ``full_name`` from its HF tensors (shapes checked first)."""
        rule, layer = self._rule(full_name)
        srcs = []
        for pattern, symbolic in rule.hf:
            hf_name = pattern.format(i=layer)
            if hf_name not in tensors:
                raise KeyError(f"{full_name} needs HF tensor {hf_name}, which the checkpoint lacks")
            t = tensors[hf_name]
            self.check_hf_shape(hf_name, tuple(t.shape), symbolic)
            srcs.append(t)
        return RESHAPES[rule.reshape][0](srcs, self.dims)

    def megatron_to_hf(self, full_name: str, tensor: torch.Tensor, param=None) -> List[Tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs of one Megatron full tensor; ``[]`` for what HF does not store."""
        if is_alp_param(full_name, param):
            return []  # ALP's sigma is trainer-only
        if full_name == "output_layer.weight" and self.model.tie_embeddings:
            return []  # the tied copy; HF reads the embedding
        rule, layer = self._rule(full_name)
        parts = RESHAPES[rule.reshape][1](tensor, self.dims)
        names = [n.format(i=layer) for n, _ in rule.hf]
        out = []
        for name, (_, symbolic), t in zip(names, rule.hf, parts, strict=True):
            want = self.dims.resolve(symbolic)
            if tuple(t.shape) != want:
                raise ShapeMismatchError(f"shape mismatch for {full_name} -> {name}: got {tuple(t.shape)}, "
                                         f"expected {want} ({' x '.join(symbolic)})")
            out.append((name, t))
        return out


def megatron_to_hf(weight_map: WeightMap, named_tensors) -> Iterable[Tuple[str, torch.Tensor]]:
    """Stream HF (name, tensor) pairs from Megatron (full name, full tensor) pairs."""
    for full_name, tensor in named_tensors:
        yield from weight_map.megatron_to_hf(full_name, tensor)
