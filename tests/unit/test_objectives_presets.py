"""The configs/algo presets load strictly and carry the reference defaults of ALGORITHMS.md; the
`algorithm` section validates its hyper-parameters."""

from pathlib import Path

import pytest
import torch

from megatron_alp.algo import config as algo_config
from megatron_alp.algo.objectives import OBJECTIVES, token_losses
from megatron_alp.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "algo"

# preset -> (alp.enabled, expected algorithm fields), numbers copied from ALGORITHMS.md
EXPECTED = {
    "token_alp": (True, dict(objective="bypass_token", eps_low=0.5, eps_high=3.0, dual_clip=10.0)),
    "seq_alp": (True, dict(objective="bypass_seq", eps_low=0.5, eps_high=3.0, dual_clip=10.0)),
    "seq_bypass": (False, dict(objective="bypass_seq", eps_low=0.5, eps_high=3.0)),
    # single-turn MIS: lower bound 1 / upper (verl rollout IS, threshold_lower null = 1/upper)
    "token_mis": (False, dict(objective="mis_token", eps_low=0.2, eps_high=0.28, is_low=1 / 3, is_high=3.0,
                              recompute_old_logp=True)),
    "seq_mis": (False, dict(objective="mis_seq", eps_low=0.2, eps_high=0.28, is_low=1 / 3, is_high=3.0,
                            recompute_old_logp=True)),
    "grpo": (False, dict(objective="ppo", eps_low=0.2, eps_high=0.28, recompute_old_logp=True)),
    # GSPO as the ALP reference's multi-turn/train_gspo.sh: geometric ratio vs recomputed pi_old, seq MIS mask 0..5
    "gspo": (False, dict(objective="mis_seq_geo", eps_low=3e-4, eps_high=4e-4, dual_clip=100.0, is_low=0.0,
                         is_high=5.0, veto=None, recompute_old_logp=True, kl_coef=0.0)),
    "dppo_tv": (False, dict(objective="dppo_tv", delta=0.15, trunc=None)),
    "dppo_kl": (False, dict(objective="dppo_kl", delta=0.05, trunc=None)),
    "drpo": (False, dict(objective="drpo", delta=12.5, aggregation="seq-mean-token-sum-norm", horizon=8192,
                         advantage="grpo_no_std")),
    "spo": (False, dict(objective="spo", delta=12.5, advantage="grpo_no_std")),  # UniRL DRPO/config.yaml
    "drpo_mask": (False, dict(objective="drpo_mask", delta=12.5, dppo_delta=0.15)),
}


def test_exactly_the_issue_presets_exist():
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_loads_strictly_with_reference_defaults(name):
    cfg = load_config(PRESETS / f"{name}.yaml")
    alp_on, fields = EXPECTED[name]
    assert cfg.alp.enabled is alp_on
    for k, v in fields.items():
        assert getattr(cfg.algorithm, k) == v, (name, k)
    if alp_on:  # single-turn math reference values
        assert (cfg.alp.sigma_init, cfg.alp.sigma_lr) == (0.02, 1e-2)
    # The configured hyper-parameters are exactly what token_losses accepts.
    hp = cfg.algorithm.objective_hparams()
    lp = torch.log(torch.tensor([[0.3, 0.5]]))
    out = token_losses(cfg.algorithm.objective, lp, lp - 0.1, torch.ones(1, 2), torch.ones(1, 2), old_logp=lp, **hp)
    assert torch.isfinite(out).all()


def test_preset_composes_with_overrides():
    cfg = load_config(PRESETS / "seq_mis.yaml", ["algorithm.is_high=5", "algorithm.dual_clip=3"])
    assert cfg.algorithm.objective_hparams()["is_high"] == 5.0


def test_config_objective_list_matches_implementation():
    import dataclasses
    import typing

    from megatron_alp.algo.objectives import _FAMILY_LOSS
    from megatron_alp.algo.registry import REGISTRY

    allowed = typing.get_args(typing.get_type_hints(algo_config.AlgorithmConfig)["objective"])
    assert allowed == tuple(OBJECTIVES) == tuple(REGISTRY)
    assert {o.family for o in REGISTRY.values()} == set(_FAMILY_LOSS), "a family without a loss function"
    for name, spec in REGISTRY.items():  # every hyper-parameter is a field of the config section
        assert set(spec.hparam_names) <= {f.name for f in dataclasses.fields(algo_config.AlgorithmConfig)}, name


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["algorithm.dual_clip=1.0"], "algorithm.dual_clip"),
        (["algorithm.eps_low=1.5"], "algorithm.eps_low"),
        (["algorithm.objective=mis_token", "algorithm.recompute_old_logp=true", "algorithm.is_low=5"],
         "algorithm.is_low"),
        (["algorithm.objective=drpo", "algorithm.delta=-1"], "algorithm.delta"),
        (["algorithm.veto=0"], "algorithm.veto"),
        (["algorithm.trunc=-2"], "algorithm.trunc"),
        (["algorithm.objective=ppo"], "algorithm.recompute_old_logp"),
        (["algorithm.aggregation=seq-mean-token-sum-norm"], "algorithm.horizon"),
        (["algorithm.kl_coef=-0.1"], "algorithm.kl_coef"),
    ],
)
def test_invalid_algorithm_section_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_unknown_algorithm_key_is_rejected():
    with pytest.raises(ValueError, match="clip_ratio"):
        load_config(None, ["algorithm.clip_ratio=0.2"])
