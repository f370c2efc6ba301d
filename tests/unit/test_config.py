"""The typed config tree: strict YAML, composition, overrides, cross-field checks, Megatron bridge."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_alp.config import Config, ConfigError, ParallelConfig, dump_yaml, load_config
from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.runtime.distributed import validate_layout

MODEL_PRESETS = sorted((CONFIG_ROOT / "model").glob("*.yaml"))


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.parallel.tp == 1 and cfg.alp.enabled is False


def test_unknown_key_names_key_section_and_suggestion(tmp_path):
    p = _write(tmp_path, "c.yaml", {"model": {"num_layer": 4}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'num_layer'" in msg and "'model'" in msg and "num_layers" in msg


def test_unknown_section_suggests(tmp_path):
    p = _write(tmp_path, "c.yaml", {"algorithim": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'algorithim'.*did you mean 'algorithm'"):
        load_config(p)


def test_wrong_type_names_field_and_type(tmp_path):
    p = _write(tmp_path, "c.yaml", {"parallel": {"tp": "two"}})
    with pytest.raises(ConfigError, match=r"parallel\.tp: expected int, got 'two'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"alp\.enabled: expected bool"):
        load_config(None, ["alp.enabled=3"])


def test_literal_suggests_closest():
    with pytest.raises(ConfigError, match=r"algorithm\.objective.*did you mean 'drpo'"):
        load_config(None, ["algorithm.objective=drop"])


def test_bus_checksum_defaults_to_xxh3_and_is_checked():
    assert load_config().bus.checksum == "xxh3_128"
    assert load_config(None, ["bus.checksum=sha256"]).bus.checksum == "sha256"
    with pytest.raises(ConfigError, match=r"bus\.checksum.*did you mean 'sha256'"):
        load_config(None, ["bus.checksum=sha265"])


def test_float_accepts_yaml_exponent_without_dot():
    cfg = load_config(None, ["optimizer.lr=1e-6"])
    assert cfg.optimizer.lr == pytest.approx(1e-6)


def test_include_composition_and_override_order(tmp_path):
    _write(tmp_path, "base.yaml", {"model": {"num_layers": 6, "hidden_size": 128}, "run": {"seed": 1}})
    top = _write(tmp_path, "top.yaml", {"include": ["base.yaml", "model/tiny.yaml"], "run": {"seed": 2}})
    cfg = load_config(top, ["run.steps=7"])
    # model/tiny.yaml (resolved against configs/) comes after base.yaml, so it wins.
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64
    assert cfg.run.seed == 2 and cfg.run.steps == 7


def test_include_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", {"include": ["b.yaml"]})
    _write(tmp_path, "b.yaml", {"include": ["a.yaml"]})
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["run.steps"])


def test_cross_field_checks_name_fields():
    with pytest.raises(ValueError, match=r"parallel\.sequence_parallel needs parallel\.tp > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ValueError, match=r"model\.num_attention_heads = 4 is not divisible by parallel\.tp = 3"):
        load_config(None, ["parallel.tp=3"])
    with pytest.raises(ValueError, match=r"model\.num_layers = 2 is not divisible by parallel\.pp = 4"):
        load_config(None, ["parallel.pp=4"])
    with pytest.raises(ValueError, match=r"alp\.layers has indices \[5\]"):
        load_config(None, ["alp.layers=[0, 5]"])
    with pytest.raises(ValueError, match=r"alp\.layers = 'top:2'"):
        load_config(None, ["alp.layers=top:2"])


def test_impossible_layout_for_world_size():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .* = 2 x 2 x 1 = 4"):
        validate_layout(ParallelConfig(tp=2, pp=2), 6)
    with pytest.raises(ValueError, match=r"parallel\.dp = 4 but world size 8"):
        validate_layout(ParallelConfig(tp=4, dp=4), 8)
    layout = validate_layout(ParallelConfig(tp=2, pp=2), 8)
    assert layout.dp == 2


@pytest.mark.parametrize("preset", MODEL_PRESETS, ids=lambda p: p.stem)
def test_model_presets_load_and_map_to_megatron(preset):
    from megatron_alp.config.megatron import to_transformer_config

    cfg = load_config(preset)
    tc = to_transformer_config(cfg.model, cfg.parallel, cfg.precision)
    assert tc.num_layers == cfg.model.num_layers
    assert tc.hidden_size == cfg.model.hidden_size
    assert tc.num_query_groups == (cfg.model.num_query_groups or cfg.model.num_attention_heads)
    assert tc.add_qkv_bias == cfg.model.qkv_bias and tc.qk_layernorm == cfg.model.qk_layernorm
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["run.steps=3", "algorithm.objective=drpo", "algorithm.delta=12.5"])
    out = tmp_path / "run" / "config.yaml"
    dump_yaml(cfg, out)
    again = load_config(out)
    assert again == cfg


def test_fp8_refused_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal path is for CPU-only machines")
    with pytest.raises(ValueError, match=r"precision\.train = fp8 needs a CUDA GPU"):
        load_config(None, ["precision.train=fp8"])


def test_vocab_padding():
    from megatron_alp.model.vocab import padded_vocab_size

    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 8) == 149 * 1024  # ceil(151936 / 1024) blocks of 128 x 8
    assert padded_vocab_size(250, 128, 2) == 256
    with pytest.raises(ValueError):
        padded_vocab_size(0, 128, 1)
