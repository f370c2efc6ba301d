"""The converter's name maps and reshapes, on one process (no Megatron world).

- the GQA QKV interleave equals a naive per-group construction, and every reshape inverts exactly;
- for each family, the map covers exactly the tensors transformers saves, and HF -> Megatron -> HF
  is bitwise on random tensors of the configured shapes;
- an unsupported ``model_type`` and a wrong tensor shape fail with the intended messages.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatron_alp.convert import (
    ShapeMismatchError,
    UnsupportedModelError,
    WeightMap,
    model_config_from_hf,
    read_hf_config,
)
from megatron_alp.convert.reshape import RESHAPES, Dims, qkv_to_megatron
from tests.distributed.convert_models import KINDS, make_hf_model, read_hf_tensors


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: make_hf_model(str(root / k), k) for k in KINDS}


def _wmap(path):
    hf = read_hf_config(path)
    return WeightMap.for_model(hf["model_type"], model_config_from_hf(hf, path))


def test_qkv_interleave_matches_naive_grouping():
    dims = Dims(hidden=8, ffn=12, vocab=10, heads=6, groups=2, head_dim=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 8, generator=g) for n in (dims.q, dims.kv, dims.kv))
    per_group = dims.heads // dims.groups
    naive = []
    for grp in range(dims.groups):  # Megatron: group g = its query heads, then k_g, then v_g
        for h in range(grp * per_group, (grp + 1) * per_group):
            naive.append(q[h * 4:(h + 1) * 4])
        naive += [k[grp * 4:(grp + 1) * 4], v[grp * 4:(grp + 1) * 4]]
    assert torch.equal(qkv_to_megatron([q, k, v], dims), torch.cat(naive))
    bias = [t[:, 0].contiguous() for t in (q, k, v)]
    assert torch.equal(qkv_to_megatron(bias, dims), torch.cat(naive)[:, 0])


@pytest.mark.parametrize("name", sorted(RESHAPES))
def test_reshapes_invert_exactly(name):
    dims = Dims(hidden=8, ffn=12, vocab=10, heads=6, groups=3, head_dim=4)
    shapes = {"copy": [(8, 12)], "vocab": [(10, 8)], "qkv": [(24, 8), (12, 8), (12, 8)], "gate_up": [(12, 8)] * 2}
    srcs = [torch.randn(s) for s in shapes[name]]
    to_m, to_hf = RESHAPES[name]
    back = to_hf(to_m(srcs, dims), dims)
    assert len(back) == len(srcs) and all(torch.equal(a, b) for a, b in zip(srcs, back, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_map_covers_hf_checkpoint_and_round_trips(hf_dirs, kind):
    wmap = _wmap(hf_dirs[kind])
    saved = read_hf_tensors(hf_dirs[kind])
    assert sorted(wmap.all_hf_names()) == sorted(n for n in saved if not wmap.is_ignored_hf(n))
    for name in wmap.megatron_names():
        srcs = {n: saved[n] for n in wmap.hf_names(name)}
        full = wmap.hf_to_megatron(name, srcs)
        back = dict(wmap.megatron_to_hf(name, full))
        assert back.keys() == srcs.keys()
        assert all(torch.equal(back[n], srcs[n]) for n in srcs), name


def test_family_specific_tensors(hf_dirs):
    names = {k: set(_wmap(p).megatron_names()) for k, p in hf_dirs.items()}
    assert "decoder.layers.3.self_attention.linear_qkv.bias" in names["qwen2"]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in names["qwen3"]
    assert not any("bias" in n or "layernorm.weight" in n and "q_" in n for n in names["llama"])
    assert "output_layer.weight" in names["qwen2"] and "output_layer.weight" not in names["qwen2-tied"]
    wmap = _wmap(hf_dirs["qwen3"])
    assert wmap.dims.head_dim == 24 and wmap.dims.q == 96  # explicit head_dim != hidden / heads


def test_trainer_only_and_tied_tensors_are_not_exported(hf_dirs):
    tied = _wmap(hf_dirs["qwen2-tied"])
    assert tied.megatron_to_hf("decoder.layers.0.perturbation.log_sigma", torch.zeros(())) == []
    assert tied.megatron_to_hf("output_layer.weight", torch.zeros(250, 64)) == []
    with pytest.raises(KeyError, match="no qwen2 rule"):
        tied.megatron_to_hf("decoder.layers.0.mlp.router.weight", torch.zeros(1))
    with pytest.raises(KeyError, match="out of range"):
        tied.megatron_to_hf("decoder.layers.4.input_layernorm.weight", torch.zeros(64))
    # Transformer Engine's fused-norm names map like the local spec's.
    te = tied.megatron_to_hf("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight", torch.ones(64))
    assert [n for n, _ in te] == ["model.layers.2.input_layernorm.weight"]


def test_unsupported_model_type_lists_supported(hf_dirs, tmp_path):
    bad = tmp_path / "mistral"
    shutil.copytree(hf_dirs["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(cfg))
    msg = r"unsupported model_type 'mistral'; supported: llama, qwen2, qwen3"
    with pytest.raises(UnsupportedModelError, match=msg):
        model_config_from_hf(read_hf_config(str(bad)))


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dirs, tmp_path):
    from safetensors.torch import save_file

    from megatron_alp.convert.pipeline import preflight

    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["qwen2"], bad)
    tensors = read_hf_tensors(str(bad))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(40, 64)
    os.remove(bad / "model.safetensors")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    msg = r"shape mismatch for model\.layers\.1\.self_attn\.k_proj\.weight: checkpoint has \(40, 64\), " \
          r"config\.json implies \(32, 64\)"
    with pytest.raises(ShapeMismatchError, match=msg):
        preflight(str(bad))  # from the safetensors header, before any weight is read
    wmap = _wmap(str(bad))
    srcs = {n: tensors[n] for n in wmap.hf_names("decoder.layers.1.self_attention.linear_qkv.weight")}
    with pytest.raises(ShapeMismatchError, match=msg):
        wmap.hf_to_megatron("decoder.layers.1.self_attention.linear_qkv.weight", srcs)


def test_unmapped_tensor_in_checkpoint_is_an_error(hf_dirs, tmp_path):
    from safetensors.torch import save_file

    from megatron_alp.convert.pipeline import preflight

    bad = tmp_path / "extra"
    shutil.copytree(hf_dirs["llama"], bad)
    tensors = read_hf_tensors(str(bad))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)  # attention_bias not declared
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not know.*o_proj\.bias"):
        preflight(str(bad))
