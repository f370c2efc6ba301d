"""HF -> Megatron (TP/PP) -> HF is bitwise, and the Megatron model computes what transformers does.

Tiny random Qwen2 (QKV bias; tied and untied), Qwen3 (QK-norm, head_dim != hidden/heads) and Llama
(GQA, Llama-3.1 RoPE scaling) made with transformers. One spawned gloo world of 2 converts each
model at TP=2, PP=2 and TP=1 (DP=2), and exports each checkpoint at another layout than it was
written at (resharding on load). A world of 4 does TP=2 x PP=2 with tied embeddings.

Tolerance of the logits comparison (both sides fp32): max abs difference of logits and
log-probs <= 1e-5 (observed ~1e-6: summation order); a wrong mapping gives O(1) differences.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.convert_models import KINDS, V, make_hf_model, read_hf_tensors

TOL = 1e-5
# (layout the checkpoint is written at, layout it is exported at)
PLANS = (((2, 1), (1, 2)), ((1, 2), (2, 1)), ((1, 1), (1, 1)))


def _mdir(root, kind, layout):
    return os.path.join(root, f"{kind}-mcore-tp{layout[0]}pp{layout[1]}")


def _hdir(root, kind, src, dst):
    return os.path.join(root, f"{kind}-tp{src[0]}pp{src[1]}-hf-tp{dst[0]}pp{dst[1]}")


def _load_alp(mcore_dir, target):
    """A trainer-style ALP model at TP=2 loads a converted checkpoint; returns its non-sigma weights."""
    from megatron_alp.config import ParallelConfig, load_config
    from megatron_alp.convert import load_megatron_checkpoint, read_meta
    from megatron_alp.convert.mcore_ckpt import model_config_from_meta
    from megatron_alp.model.alp.spec import alp_block_spec
    from megatron_alp.model.builder import build_gpt_model
    from megatron_alp.model.sharding import full_state_dict
    from megatron_alp.runtime.distributed import init_parallel_state

    cfg = load_config(None, ["alp.enabled=true", f"alp.target={target}"])
    cfg.model, cfg.parallel = model_config_from_meta(read_meta(mcore_dir)), ParallelConfig(tp=2)
    init_parallel_state(cfg.parallel, cfg.model, seed=3)
    model = build_gpt_model(cfg.model, cfg.parallel, cfg.precision,
                            block_spec=lambda c: alp_block_spec(cfg.model, cfg.alp, c))
    load_megatron_checkpoint(model, mcore_dir)
    sigmas = [float(p.exp()) for n, p in model.named_parameters() if n.endswith("log_sigma")]
    return full_state_dict(model, V), sigmas


def _world(rank, world_size, root, dirs, other):
    from megatron_alp.convert.pipeline import hf_to_mcore, mcore_to_hf
    from megatron_alp.convert.verify import verify
    from megatron_alp.runtime.distributed import init_distributed

    init_distributed()
    out = {"verify": {}}
    for kind, src in dirs.items():
        for a, _ in PLANS:
            hf_to_mcore(src, _mdir(root, kind, a), *a, progress=False)
        for a, b in PLANS:
            mcore_to_hf(_mdir(root, kind, a), _hdir(root, kind, a, b), *b, progress=False)
        out["verify"][kind] = {f"tp{a[0]}pp{a[1]}": verify(_mdir(root, kind, a), src, *a, tol=TOL)
                               for a, _ in PLANS[:2]}
    # verify fails against another model of the same shapes.
    out["verify_other"] = verify(_mdir(root, "qwen2", (1, 1)), other, 1, 2, tol=TOL)
    # bf16: written and exported in bf16.
    hf_to_mcore(dirs["qwen3"], os.path.join(root, "qwen3-bf16"), 2, 1, dtype=torch.bfloat16, progress=False)
    mcore_to_hf(os.path.join(root, "qwen3-bf16"), os.path.join(root, "qwen3-bf16-hf"), 1, 2, progress=False)
    # The trainer's path: ALP models (perturbed layers; logits-only) load the stock checkpoint.
    from megatron_alp.convert import load_megatron_checkpoint
    from megatron_alp.convert.mcore_ckpt import model_config_from_meta, read_meta
    from megatron_alp.convert.pipeline import build_for_conversion
    from megatron_alp.model.sharding import full_state_dict

    m = _mdir(root, "qwen2", (1, 2))
    stock = build_for_conversion(model_config_from_meta(read_meta(m)), 2, 1, torch.float32)
    load_megatron_checkpoint(stock, m)
    out["stock"] = full_state_dict(stock, V)
    out["alp"] = {t: _load_alp(m, t) for t in ("layers", "logits")}
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert"))
    dirs = {k: make_hf_model(os.path.join(root, k), k) for k in KINDS}
    other = make_hf_model(os.path.join(root, "qwen2-other"), "qwen2", seed=7)
    results = run_world(_world, 2, args=(root, dirs, other), timeout=500)
    return root, dirs, results


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"tp{p[0][0]}pp{p[0][1]}-to-tp{p[1][0]}pp{p[1][1]}")
def test_round_trip_is_bitwise(converted, kind, plan):
    root, dirs, _ = converted
    src = read_hf_tensors(dirs[kind])
    out_dir = _hdir(root, kind, *plan)
    got = read_hf_tensors(out_dir)
    tied = kind == "qwen2-tied"
    assert set(got) == set(src) - ({"lm_head.weight"} if tied else set())
    for name, t in src.items():
        if name in got:
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())


@pytest.mark.parametrize("kind", KINDS)
def test_megatron_logits_match_transformers(converted, kind):
    _, _, results = converted
    for rank_result in results:  # every rank got the same report
        for layout, rep in rank_result["verify"][kind].items():
            assert rep["ok"], (layout, rep)
            assert rep["max_abs_logits"] <= TOL and rep["max_abs_logprobs"] <= TOL, (layout, rep)


def test_verify_detects_other_weights(converted):
    rep = converted[2][0]["verify_other"]
    assert not rep["ok"] and rep["max_abs_logits"] > 100 * TOL, rep


def test_bf16_round_trip(converted):
    root, dirs, _ = converted
    src = read_hf_tensors(dirs["qwen3"])
    got = read_hf_tensors(os.path.join(root, "qwen3-bf16-hf"))
    assert set(got) == set(src)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], src[n].to(torch.bfloat16)) for n in src)
    with open(os.path.join(root, "qwen3-bf16-hf", "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_alp_models_load_converted_checkpoint(converted):
    _, _, results = converted
    for r in results:
        stock = r["stock"]
        for target, (weights, sigmas) in r["alp"].items():
            assert set(weights) == set(stock), target
            assert all(torch.equal(weights[n], stock[n]) for n in stock), target
            assert sigmas and all(abs(s - 0.02) < 1e-6 for s in sigmas), (target, sigmas)  # left at sigma_init


def _world_tp2pp2(rank, world_size, root, src):
    from megatron_alp.convert.pipeline import hf_to_mcore, mcore_to_hf
    from megatron_alp.convert.verify import verify
    from megatron_alp.runtime.distributed import init_distributed

    init_distributed()
    m = os.path.join(root, "mcore-tp2pp2")
    hf_to_mcore(src, m, 2, 2, progress=False)
    mcore_to_hf(m, os.path.join(root, "hf-tp2pp2"), 2, 2, progress=False)
    mcore_to_hf(m, os.path.join(root, "hf-tp1pp1"), 1, 1, progress=False)  # DP=4
    return verify(m, src, 2, 2, tol=TOL)


def test_tp2_pp2_tied(tmp_path):
    src = make_hf_model(str(tmp_path / "qwen2-tied"), "qwen2-tied", seed=3)
    reports = run_world(_world_tp2pp2, 4, args=(str(tmp_path), src), timeout=400)
    assert all(r["ok"] and r["max_abs_logprobs"] <= TOL for r in reports), reports[0]
    want = read_hf_tensors(src)
    for out in ("hf-tp2pp2", "hf-tp1pp1"):
        got = read_hf_tensors(str(tmp_path / out))
        assert set(got) == set(want) - {"lm_head.weight"}
        assert all(torch.equal(got[n], want[n]) for n in got), out
