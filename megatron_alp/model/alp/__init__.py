"""ALP: Adaptive Layerwise Perturbation inside Megatron-Core layers (see docs/alp.md)."""

from .noise import token_codes
from .params import is_alp_param, sigma_param_group_overrides
from .perturb import Perturbation, alp_forward, current_context
from .spec import PerturbedTransformerLayer, alp_block_spec, perturbed_layers

__all__ = [
    "Perturbation", "PerturbedTransformerLayer", "alp_block_spec", "alp_forward", "current_context",
    "is_alp_param", "perturbed_layers", "sigma_param_group_overrides",
    "token_codes",
]
