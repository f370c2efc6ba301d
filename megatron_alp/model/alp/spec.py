"""ALP placed through Megatron specs: the stock spec with one change.

For a perturbed layer the layer spec's module becomes :class:`PerturbedTransformerLayer`, a
``TransformerLayer`` that adds the noise to its input hidden state and then runs the stock forward
unchanged: the perturbed ``h`` is what the layer's first norm sees *and* what flows on in the
residual, as in the reference (which replaces ``hidden_states`` before ``input_layernorm``). The
submodules (TE or local) are the stock ones, untouched. Megatron's classes are neither edited nor
copied. The logits-only variant replaces the block's final-norm slot with the stock norm followed
by a perturbation.
"""

from __future__ import annotations

import copy
from typing import List

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..specs import final_norm_spec, stock_block_spec, stock_layer_spec
from .perturb import Perturbation


def perturbed_layers(alp, num_layers: int) -> List[int]:
    """0-based global indices of the perturbed decoder layers (empty for the logits variant).

    ``alp.layers``: 'all'; 'first:K' / 'last:K'; 'early' / 'middle' / 'late' (thirds of the depth,
    the paper's layer ablation; the remainder goes to the middle third); or an explicit list.
    """
    if alp.target == "logits":
        return []
    spec = alp.layers
    if isinstance(spec, list):
        return sorted(set(int(i) for i in spec))
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith(("first:", "last:")):
        kind, k = spec.split(":")
        k = min(int(k), num_layers)
        return list(range(k)) if kind == "first" else list(range(num_layers - k, num_layers))
    third = num_layers // 3
    bounds = {"early": (0, third), "middle": (third, num_layers - third), "late": (num_layers - third, num_layers)}
    if spec not in bounds:
        raise ValueError(f"alp.layers = {spec!r} is not a known selection")
    lo, hi = bounds[spec]
    return list(range(lo, hi))


class PerturbedTransformerLayer(TransformerLayer):
    """The stock TransformerLayer whose input hidden state is perturbed first."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, *, alp, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, **kwargs)
        # layer_number is Megatron's 1-based *global* number (pipeline offset included).
        self.perturbation = Perturbation(config, alp, index=self.layer_number - 1)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self.perturbation(kwargs["hidden_states"])
        else:
            args = (self.perturbation(args[0]),) + tuple(args[1:])
        return super().forward(*args, **kwargs)


class PerturbedFinalNorm(torch.nn.Module):
    """The block's stock final norm, then the logits-only perturbation."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, alp, norm_spec=None, **kwargs):
        super().__init__()
        self.norm = build_module(norm_spec or final_norm_spec(), config=config, hidden_size=hidden_size, eps=eps)
        self.perturbation = Perturbation(config, alp, index=config.num_layers)

    def forward(self, x):
        return self.perturbation(self.norm(x))


def alp_layer_spec(stock: ModuleSpec, alp) -> ModuleSpec:
    """The stock layer spec with its module swapped for :class:`PerturbedTransformerLayer`."""
    if not issubclass(stock.module, TransformerLayer):
        raise TypeError(f"ALP perturbs TransformerLayer specs, got {stock.module.__name__}")
    spec = copy.copy(stock)
    spec.module = PerturbedTransformerLayer
    spec.params = {**(stock.params or {}), "alp": alp}
    return spec


def alp_block_spec(model_cfg, alp, config):
    """Block spec for this pipeline stage with ALP placed per ``alp`` (enabled or not)."""
    stock = stock_layer_spec(model_cfg)
    if not alp.enabled:
        return stock_block_spec(model_cfg, config, stock)
    chosen = set(perturbed_layers(alp, model_cfg.num_layers))
    perturbed = alp_layer_spec(stock, alp)
    block = stock_block_spec(model_cfg, config, lambda i: perturbed if i in chosen else stock)
    if alp.target == "logits":
        block.layer_norm = ModuleSpec(module=PerturbedFinalNorm, params={"alp": alp, "norm_spec": block.layer_norm})
    return block
