"""Every experiment config loads strictly, and the papers' setups carry the reference hyper-parameters.

How GPU-only configs are checked on a CPU: a config whose composed tree asks for
``precision.train: fp8`` (FP8 training needs CUDA and Transformer Engine) is (1) built strictly from
its tree without the cross-field validation (unknown keys, wrong types and bad literals still fail),
(2) loaded and fully validated with ``precision.train=bf16`` overridden, and (3) shown to be
refused as-is with the CUDA/Transformer Engine message when those are missing. Everything else is
loaded as-is with ``load_config`` (strict keys and types plus every ``validate()``).

The batch layout (samples divisible over data-parallel ranks, mini-batches and micro-batches) is
checked with the trainer's own ``load_and_check`` for the node size each setup is written for:
8 GPUs for the papers' setups, 1 process for the CPU mini-reproduction (on a CPU with
``precision.train=fp32``, since the trainer refuses bf16/fp8 training there; the layout does not
depend on it).
"""

from __future__ import annotations

import pytest

from megatron_alp.config import Config, load_config
from megatron_alp.config.loader import CONFIG_ROOT, from_dict, load_yaml_tree

EXP = CONFIG_ROOT / "experiments"
EXPERIMENTS = sorted(EXP.rglob("*.yaml"))
ALP_PRESETS = {"token_alp", "seq_alp", "seq_bypass", "token_mis", "seq_mis", "grpo", "gspo"}
OBJECTIVES = {"token_alp": "bypass_token", "seq_alp": "bypass_seq", "seq_bypass": "bypass_seq",
              "token_mis": "mis_token", "seq_mis": "mis_seq", "grpo": "ppo", "gspo": "mis_seq_geo"}
PRECISIONS = {"bf16": ("bf16", "bf16"), "fp8_rollout": ("bf16", "fp8"), "fp8_e2e": ("fp8", "fp8")}
DRPO_OBJECTIVES = {"grpo": "bypass_token", "dppo": "dppo_tv", "drpo": "drpo"}


def _fp8_training_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _wants_fp8_training(path) -> bool:
    return (load_yaml_tree(path).get("precision") or {}).get("train") == "fp8"


def load_experiment(path, overrides=()) -> Config:
    """The config, fully validated; FP8-training configs with bf16 training where FP8 cannot run."""
    if _wants_fp8_training(path) and not _fp8_training_available():
        overrides = [*overrides, "precision.train=bf16"]
    return load_config(path, overrides)


def _runnable(path) -> bool:
    return path.stem != "base" and not path.stem.startswith("method_")


def test_the_suite_is_complete():
    names = {p.relative_to(EXP).as_posix() for p in EXPERIMENTS}
    for setup in ("alp_math", "alp_tir"):
        assert {f"{setup}/{m}.yaml" for m in ALP_PRESETS} <= names
    assert {f"drpo_precision/{m}_{p}.yaml" for m in DRPO_OBJECTIVES for p in PRECISIONS} <= names
    assert {f"mini_repro/{m}.yaml" for m in ("seq_bypass", "seq_alp", "token_alp", "token_mis",
                                             "grpo", "dppo", "drpo")} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.relative_to(EXP).as_posix())
def test_experiment_config_loads_strictly(path):
    tree = load_yaml_tree(path)
    from_dict(Config, tree)  # strict keys, types and literals, before any cross-field check
    cfg = load_experiment(path)
    assert isinstance(cfg, Config)
    if _wants_fp8_training(path) and not _fp8_training_available():
        with pytest.raises(ValueError, match="precision.train = fp8 needs (a CUDA GPU|Transformer Engine)"):
            load_config(path)


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.parent.name in ("alp_math", "alp_tir",
                                                                             "drpo_precision", "mini_repro")
                                  and _runnable(p)], ids=lambda p: p.relative_to(EXP).as_posix())
def test_batch_layout_fits_its_node(path, monkeypatch):
    from megatron_alp.trainer.setup import load_and_check

    cpu = path.parent.name == "mini_repro"
    monkeypatch.setenv("WORLD_SIZE", "1" if cpu else "8")
    overrides = ["model.hf_path=unused"] if cpu else []
    import torch

    if not torch.cuda.is_available():  # the trainer refuses bf16/fp8 training on CPU; layout is the same
        overrides.append("precision.train=fp32")
    cfg = load_and_check(str(path), overrides)
    assert cfg.run.mini_batches_per_step > 1  # every setup here has policy staleness


@pytest.mark.parametrize("preset", sorted(ALP_PRESETS))
def test_alp_single_turn_reference_hparams(preset):
    cfg = load_experiment(EXP / "alp_math" / f"{preset}.yaml")
    r, run, a = cfg.rollout, cfg.run, cfg.algorithm
    assert cfg.model.hf_path == "Qwen/Qwen2.5-Math-1.5B" and cfg.model.num_layers == 28
    assert (run.prompts_per_step, r.n_samples) == (512, 8)
    assert run.prompts_per_step // run.mini_batches_per_step == 32 and run.mini_batches_per_step == 16
    assert cfg.optimizer.lr == pytest.approx(1e-6)
    assert (r.data.max_prompt_len, r.max_new_tokens, r.temperature, r.top_p) == (2048, 2048, 1.0, 1.0)
    assert (a.kl_coef, a.kl_estimator, a.entropy_coef) == (pytest.approx(0.001), "k3", 0.0)
    assert r.precision == "bf16" and cfg.precision.train == "bf16"
    assert a.objective == OBJECTIVES[preset] and cfg.alp.enabled == preset.endswith("_alp")
    if cfg.alp.enabled:
        assert (cfg.alp.sigma_init, cfg.alp.sigma_lr) == (pytest.approx(0.02), pytest.approx(1e-2))
    if preset.endswith("_mis"):  # rejection-sampling default: lower = 1 / upper (verl rollout IS)
        assert (a.is_low, a.is_high) == (pytest.approx(1 / 3), 3.0)


@pytest.mark.parametrize("preset", sorted(ALP_PRESETS))
def test_alp_multi_turn_reference_hparams(preset):
    cfg = load_experiment(EXP / "alp_tir" / f"{preset}.yaml")
    r, run, a, mt = cfg.rollout, cfg.run, cfg.algorithm, cfg.rollout.multi_turn
    assert cfg.model.hf_path == "Qwen/Qwen2.5-7B" and cfg.model.hidden_size == 3584
    assert (run.prompts_per_step, r.n_samples, run.prompts_per_step // run.mini_batches_per_step) == (128, 16, 32)
    assert cfg.optimizer.lr == pytest.approx(1e-6) and cfg.optimizer.clip_grad == 1.0
    # reference train_perturb.sh: 8000 per turn, 16000 per response, first prompt 4096, obs 256
    assert mt.enabled and mt.max_turns == 5 and mt.max_response_len == 16000 and r.max_new_tokens == 8000
    assert r.data.max_prompt_len == 4096 and mt.observation_max_tokens == 256 and a.kl_coef == 0.0
    assert r.data.label_key == "reward_model.ground_truth" and r.data.instruction == "simpletir"
    assert 151645 in r.stop_token_ids  # <|im_end|>: Qwen2.5 base declares only <|endoftext|>
    assert a.objective == OBJECTIVES[preset] and cfg.alp.enabled == preset.endswith("_alp")
    assert a.dual_clip == (100.0 if preset == "gspo" else 3.0)
    if cfg.alp.enabled:
        assert (cfg.alp.sigma_init, cfg.alp.sigma_lr) == (pytest.approx(1e-6), pytest.approx(5e-4))
    if preset.endswith("_mis") or preset == "gspo":  # ALP reference train_mis.sh / train_gspo.sh
        assert (a.is_low, a.is_high) == (0.0, 5.0)
    if preset in ("seq_bypass", "token_mis", "seq_mis", "grpo"):  # train_bypass.sh / train_mis.sh
        assert (a.eps_low, a.eps_high) == (0.2, 0.28)


def test_drpo_precision_grpo_cell_has_dual_clip_off():
    """The DPPO authors' GRPO comparison: dual clip effectively off (c = 10000)."""
    for precision in PRECISIONS:
        a = load_experiment(EXP / "drpo_precision" / f"grpo_{precision}.yaml").algorithm
        assert a.objective == "bypass_token" and a.dual_clip == 10000.0


@pytest.mark.parametrize("method", sorted(DRPO_OBJECTIVES))
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_drpo_precision_matrix(method, precision):
    path = EXP / "drpo_precision" / f"{method}_{precision}.yaml"
    train, rollout = PRECISIONS[precision]
    assert (load_yaml_tree(path).get("precision") or {}).get("train") == train
    cfg = load_experiment(path)
    r, run, a = cfg.rollout, cfg.run, cfg.algorithm
    assert r.precision == rollout and (precision == "bf16") == (r.kv_cache_dtype == "auto" and rollout == "bf16")
    assert cfg.model.hf_path == "Qwen/Qwen3-4B-Base" and cfg.model.family == "qwen3"
    assert (run.prompts_per_step, r.n_samples, run.mini_batches_per_step) == (64, 8, 4)
    assert cfg.optimizer.lr == pytest.approx(1e-6) and cfg.optimizer.clip_grad == 1.0
    assert (a.aggregation, a.horizon, a.advantage) == ("seq-mean-token-sum-norm", 8192, "grpo_no_std")
    assert a.objective == DRPO_OBJECTIVES[method] and not a.recompute_old_logp and a.kl_coef == 0.0
    assert (r.temperature, r.top_p) == (1.0, 1.0) and not cfg.alp.enabled
    if method == "dppo":
        assert a.delta == pytest.approx(0.6 if precision == "fp8_e2e" else 0.15)
    if method == "drpo":
        assert a.delta == pytest.approx(12.5)


def test_mini_repro_has_mismatch_and_staleness():
    for path in (EXP / "mini_repro").glob("*.yaml"):
        if not _runnable(path):
            continue
        cfg = load_config(path)
        assert cfg.rollout.precision == "fp8" and cfg.precision.train == "fp32", path.name
        assert cfg.run.mini_batches_per_step >= 8, path.name
        # mismatch/* (unperturbed pi_old vs mu) is logged for every method, recomputed or not.
        assert cfg.logging.mismatch_metrics, path.name
