"""The trainer's model is the checkpoint's model (issue 22): a converted model whose config.json
differs from the preset in RMSNorm epsilon and RoPE theta is refused with both values named; with
the checkpoint's values the trainer's logits equal transformers'. The test also shows why shapes
are not enough: the preset's values load without a shape error and compute other logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_alp.runtime.spawn import run_world

pytestmark = pytest.mark.slow  # one conversion subprocess and two single-rank worlds (~1-2 min idle)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 250
PRESET = ["model.family=qwen2", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
          "model.num_attention_heads=4", "model.num_query_groups=2", f"model.vocab_size={V}",
          "model.max_position_embeddings=512", "model.tie_embeddings=false", "model.qkv_bias=true",
          "model.norm_eps=1e-6", "model.rope_theta=10000.0"]
THEIRS = ["model.norm_eps=1e-5", "model.rope_theta=50000.0"]


def _hf_model(path):
    import transformers

    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=V, rms_norm_eps=1e-5, rope_theta=50000.0,
                                   max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms well away from 1 and small activations: eps and theta matter
        for name, p in model.named_parameters():
            p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcheck")
    src, mcore = _hf_model(str(root / "hf")), str(root / "mcore")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), "hf-to-mcore", "--hf", src,
                        "--out", mcore, "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return src, mcore


def _overrides(extra, src, mcore):
    return [*PRESET, *extra, f"model.hf_path={src}", f"checkpoint.load={mcore}", "run.prompts_per_step=1",
            "rollout.n_samples=1", "run.mini_batches_per_step=1", "run.micro_batch_size=1", "precision.train=fp32"]


def test_preset_that_differs_from_the_checkpoint_is_refused(converted, monkeypatch):
    from megatron_alp.trainer.setup import load_and_check

    src, mcore = converted
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError) as e:
        load_and_check(None, _overrides([], src, mcore))
    msg = str(e.value)
    assert "model.norm_eps: checkpoint 1e-05, config 1e-06" in msg, msg
    assert "model.rope_theta: checkpoint 50000.0, config 10000.0" in msg, msg
    # Without the converted checkpoint, the HF config.json the bus exports to the engines is checked.
    with pytest.raises(ValueError, match=r"config.json.*model.norm_eps: config.json 1e-05, config 1e-06"):
        load_and_check(None, [o for o in _overrides([], src, mcore) if not o.startswith("checkpoint.")])
    cfg = load_and_check(None, _overrides(THEIRS, src, mcore))
    assert (cfg.model.norm_eps, cfg.model.rope_theta) == (1e-5, 50000.0)


def _logits_world(rank, world_size, overrides, check):
    from megatron_alp.config import load_config
    from megatron_alp.convert import load_megatron_checkpoint
    from megatron_alp.runtime.distributed import init_distributed, init_parallel_state
    from megatron_alp.trainer.setup import build_model, load_initial_weights

    init_distributed()
    cfg = load_config(None, overrides)
    init_parallel_state(cfg.parallel, cfg.model, seed=1)
    model = build_model(cfg, alp=False)
    if check:
        load_initial_weights(cfg, model)  # the trainer's path, with the model check
    else:
        load_megatron_checkpoint(model, cfg.checkpoint.load)  # shapes only
    model.eval()
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(tokens, torch.arange(40)[None].expand(2, -1), None)
    return out[..., :V].float()


def test_trainer_logits_equal_transformers_with_the_checkpoint_values(converted):
    from transformers import AutoModelForCausalLM

    src, mcore = converted
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(tokens).logits
    ours = run_world(_logits_world, 1, args=(_overrides(THEIRS, src, mcore), True), timeout=300)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    preset = run_world(_logits_world, 1, args=(_overrides([], src, mcore), False), timeout=300)[0]
    assert (preset - ref).abs().max() > 1e-3  # the shapes fit, the function does not
