"""Megatron -> bus -> engine round trip at TP=2 and PP=2 (a spawned gloo world + a local engine).

- TP=2, disk backend: the version is exported (TP gathers, padded vocabulary stripped, QKV and
  gate/up split), committed with a log-prob spot check against the trainer's own TP=2 forward, and
  the engine's weights equal the gathered Megatron weights bit for bit (fp32).
- PP=2, nccl backend over gloo (one group per pipeline stage): the same, then the same weights as a
  PP=2 disk version (two stages' shards merged into one version); a fresh engine started on that
  directory generates exactly what the updated engine generates.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_alp.runtime.spawn import run_world
from tests.distributed.layouts import V, build, gather_tp_logits, make_cfg, positions

PROMPT = [5, 17, 42, 99, 3, 7, 120, 8]
START = 3


def _expected_logprobs(model):
    """Log-probs of PROMPT[START:] under this TP layout's forward (gathered over TP)."""
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = gather_tp_logits(model(tokens, positions(tokens), None))[0, :, :V].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[t - 1, PROMPT[t]]) for t in range(START, len(PROMPT))]


def _snapshot(fleet, names):
    from rollout.aio import run_sync

    c = fleet.live_clients[0]
    return {n: torch.tensor(run_sync(c.get_weights_by_name(n, truncate_size=10 ** 6))) for n in names}


def _full_over_stages(model):
    import torch.distributed as dist

    from megatron_alp.model.sharding import full_state_dict

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, full_state_dict(model, V))
    out = {}
    for p in parts:
        out.update(p)
    return out


def _world(rank, world_size, url, bus_dir):
    from megatron_alp.sync.publish import Publisher
    from rollout.bus.commit import SpotCheck
    from rollout.config import ClientConfig
    from rollout.fleet import Fleet

    cfg = make_cfg(extra=[f"bus.dir={bus_dir}", "bus.master_address=127.0.0.1", "bus.bucket_mb=1",
                          "bus.timeout_s=120", "rollout.precision=fp32"])
    fleet = Fleet.from_urls([url], client_config=ClientConfig(max_retries=0, control_timeout_s=120)) \
        if rank == 0 else None
    out = {}

    # TP=2, disk, with a spot check against this layout's own forward.
    model = build(cfg, tp=2)
    expected = _expected_logprobs(model)
    pub = Publisher(cfg.bus, cfg.model, precision="fp32").publish(1, [model], fleet=fleet)
    full = _full_over_stages(model)
    if rank == 0:
        rep = Publisher(cfg.bus, cfg.model).commit(fleet, pub, spot_check=SpotCheck(PROMPT, START, expected, tol=1e-4))
        out["tp2"] = {"full": full, "spot": rep.spot_max_abs_diff, "committed": rep.committed,
                      "files": sorted(pub.manifest.files), "bytes": pub.bytes}

    # PP=2: other weights, sent over one gloo group per stage, then the same weights on disk.
    model = build(cfg, pp=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25)
    cfg.bus.backend = "nccl"
    streamer = Publisher(cfg.bus, cfg.model, precision="fp32")
    pub = streamer.publish(2, [model], fleet=fleet)
    full = _full_over_stages(model)
    if rank == 0:
        rep = streamer.commit(fleet, pub)
        out["pp2_nccl"] = {"full": full, "committed": rep.committed, "errors": pub.errors, "bytes": pub.bytes}
    streamer.close()
    cfg.bus.backend = "disk"
    disk = Publisher(cfg.bus, cfg.model, precision="fp32")
    pub = disk.publish(3, [model], fleet=fleet)
    if rank == 0:
        rep = disk.commit(fleet, pub)
        out["pp2_disk"] = {"path": pub.path, "files": sorted(pub.manifest.files), "committed": rep.committed,
                           "checksum": pub.manifest.checksum}
        from rollout.aio import run_sync

        run_sync(fleet.close())
    # The same weights exported for an FP8 rollout (another bus directory; not committed), with
    # bus.checksum = sha256 (both stages' parts and the merged manifest must agree).
    cfg.bus.dir = bus_dir + "-fp8"
    cfg.bus.checksum = "sha256"
    pub = Publisher(cfg.bus, cfg.model, precision="fp8").publish(1, [model])
    if rank == 0:
        out["fp8_path"] = pub.path
    # ALP models (both noise targets): sigma is a parameter of the trainer, never exported.
    from megatron_alp.convert.hf_export import iter_hf_tensors
    from megatron_alp.convert.mapping import WeightMap
    from megatron_alp.model.alp import alp_block_spec
    from megatron_alp.model.sharding import named_global_parameters

    for target in ("layers", "logits"):
        acfg = make_cfg(extra=["alp.enabled=true", f"alp.target={target}"])
        alp_model = build(acfg, block_spec=lambda c, tc: alp_block_spec(c.model, c.alp, tc), tp=2)
        names = [n for n, _ in iter_hf_tensors([alp_model], WeightMap.for_model("qwen2", acfg.model), V)]
        sigmas = [n for n, _ in named_global_parameters(alp_model) if n.endswith("log_sigma")]
        out[f"alp_{target}"] = {"exported": names, "sigmas": sigmas}
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_alp.convert.hf_config import hf_config_for_export
    from rollout.config import ClientConfig, RolloutConfig
    from rollout.engines.start import start_engines

    model_cfg = make_cfg().model
    init_dir = str(tmp_path_factory.mktemp("init"))
    hf_cfg = hf_config_for_export(model_cfg, torch.float32)
    with open(os.path.join(init_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init_dir)).save_pretrained(init_dir)
    cfg = RolloutConfig(engine="local", precision="fp32", base_port=0, model_path=init_dir, startup_timeout_s=180,
                        client=ClientConfig(max_retries=0, control_timeout_s=120))
    launched = start_engines(cfg, log_dir=str(tmp_path_factory.mktemp("logs")))
    try:
        yield cfg, launched, model_cfg
    finally:
        launched.stop()


def _check_bitwise(weight_map, full, url):
    from rollout.aio import run_sync
    from rollout.engines.client import EngineClient

    client = EngineClient(url)
    expected = {}
    for name, t in full.items():
        for hf_name, hf_t in weight_map.megatron_to_hf(name, t):
            expected[hf_name] = hf_t
    assert "lm_head.weight" in expected and expected["model.embed_tokens.weight"].shape[0] == V  # padding gone
    for hf_name, t in expected.items():
        got = torch.tensor(run_sync(client.get_weights_by_name(hf_name, truncate_size=10 ** 6)))
        assert got.shape == t.shape and torch.equal(got, t.float()), f"{hf_name} differs on the engine"
    run_sync(client.close())
    return expected


def _check_fp8(path, expected):
    """The FP8 version: block-FP8 config, fp8 linears + scales, dequantized within e4m3's bound;
    the local engine starts on it (dequantizing) and holds those weights."""
    from rollout.bus import read_manifest, verify
    from rollout.bus.fp8 import error_bound
    from rollout.engines.local.runner import LocalModel

    config = json.load(open(os.path.join(path, "config.json")))
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    manifest = read_manifest(path)
    assert manifest.checksum == "sha256" and verify(path).checksum == "sha256"
    q = "model.layers.3.mlp.gate_proj.weight"
    assert manifest.tensors[q].dtype == "float8_e4m3fn" and manifest.tensors[q + "_scale_inv"].dtype == "float32"
    assert manifest.tensors["model.norm.weight"].dtype == "bfloat16" and manifest.precision == "fp8"
    engine = LocalModel(path, precision="fp32")
    fp8_scales = {n[: -len("_scale_inv")]: e for n, e in manifest.tensors.items() if n.endswith("_scale_inv")}
    assert len(fp8_scales) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    from safetensors.torch import load_file

    files = {}
    for name in fp8_scales:
        f = manifest.tensors[name].file
        files.setdefault(f, load_file(os.path.join(path, f)))
        got, want = engine.get_weight(name).float(), expected[name].float()
        scale = files[manifest.tensors[name + "_scale_inv"].file][name + "_scale_inv"]
        assert torch.all((got - want).abs() <= error_bound(want, scale) * (1 + 1e-6) + 1e-12), name


def test_tp2_and_pp2_round_trips_bitwise_and_match_a_fresh_engine(engine, tmp_path):
    from megatron_alp.convert.mapping import WeightMap
    from rollout.aio import run_sync
    from rollout.config import RolloutConfig
    from rollout.engines.client import EngineClient
    from rollout.engines.protocol import sampling_params
    from rollout.engines.start import start_engines

    cfg, launched, model_cfg = engine
    url = launched.urls[0]
    bus_dir = str(tmp_path / "bus")
    out = run_world(_world, 2, args=(url, bus_dir), timeout=500)[0]
    wmap = WeightMap.for_model("qwen2", model_cfg)

    tp2 = out["tp2"]
    assert tp2["committed"] == [url] and tp2["spot"][url] <= 1e-4  # engine == trainer forward
    assert tp2["bytes"] > 0 and tp2["files"] == ["model-pp0-00000.safetensors"]
    pp2 = out["pp2_nccl"]
    assert pp2["committed"] == [url] and pp2["errors"] == {}
    for target in ("layers", "logits"):  # ALP's sigma never leaves the trainer
        alp = out[f"alp_{target}"]
        assert alp["sigmas"] and sorted(alp["exported"]) == sorted(wmap.all_hf_names())
    # After version 3 (the PP=2 weights again, from disk) the engine holds the PP=2 weights.
    expected = _check_bitwise(wmap, pp2["full"], url)
    assert pp2["bytes"] == sum(t.numel() * 4 for t in expected.values())
    assert {f.split("-")[1] for f in out["pp2_disk"]["files"]} == {"pp0", "pp1"}  # both stages wrote
    assert out["pp2_disk"]["checksum"] == "xxh3_128"  # bus.checksum's default
    assert not torch.equal(tp2["full"]["decoder.final_layernorm.weight"], pp2["full"]["decoder.final_layernorm.weight"])

    _check_fp8(out["fp8_path"], expected)

    fresh_cfg = RolloutConfig(**{**cfg.__dict__, "model_path": out["pp2_disk"]["path"], "weight_version": "3"})
    fresh = start_engines(fresh_cfg, log_dir=str(tmp_path / "fresh-logs"))
    try:
        async def gen(u):
            async with EngineClient(u) as c:
                return [await c.generate(p, sampling_params(max_new_tokens=12, ignore_eos=True, temperature=0.0))
                        for p in ([1, 2, 3], PROMPT)]

        updated, started = run_sync(gen(url)), run_sync(gen(fresh.urls[0]))
    finally:
        fresh.stop()
    # Two engine processes: same weights, but float sums may associate differently (thread
    # count, batching), so log-probs agree within a stated tolerance, not bitwise.
    for a, b in zip(updated, started, strict=True):
        assert a.output_ids == b.output_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
        assert a.weight_version == b.weight_version == "3"
