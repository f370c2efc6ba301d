"""Version 0 written before the engines start (megatron_alp/sync/v0.py): block FP8 from the HF
checkpoint with the bus's own quantizer, a manifest that verifies, the FP8 declaration in
config.json; reused by a resubmitted job and found by the trainer; refused on a used bus."""

import json

import pytest
import torch

from megatron_alp.config import load_config
from megatron_alp.config.loader import CONFIG_ROOT
from megatron_alp.sync.v0 import prepublished, publish_v0
from rollout.bus import DiskBus, read_manifest, verify
from rollout.bus.fp8 import QUANTIZATION_CONFIG, SCALE_SUFFIX, dequantize, error_bound
from rollout.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=256, num_layers=2,
                           intermediate_size=384, init_std=0.05, seed=3)


def _cfg(hf, bus_dir, precision):
    return load_config(CONFIG_ROOT / "experiments" / "tiny_cpu_slurm.yaml",
                       [f"model.hf_path={hf}", f"bus.dir={bus_dir}", f"rollout.precision={precision}"])


def test_fp8_version_0_from_the_hf_checkpoint(hf, tmp_path):
    from safetensors.torch import load_file

    path = publish_v0(_cfg(hf, tmp_path / "bus", "fp8"))
    m = verify(path)
    assert m.version == 0 and m.precision == "fp8" and m.quantization == QUANTIZATION_CONFIG
    assert json.load(open(f"{path}/config.json"))["quantization_config"] == QUANTIZATION_CONFIG
    src = load_file(f"{hf}/model.safetensors")
    pub = {}
    for f in m.files:
        pub.update(load_file(f"{path}/{f}"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert pub[name].dtype == torch.float8_e4m3fn and pub[name + SCALE_SUFFIX].shape == (3, 2)  # 384x256 / 128
    w = src[name].float()
    scale = pub[name + SCALE_SUFFIX]
    assert ((dequantize(pub[name], scale) - w).abs() <= error_bound(w, scale)).all()
    assert pub["model.embed_tokens.weight"].dtype == torch.bfloat16  # outside the layers: bf16
    assert set(n for n in pub if not n.endswith(SCALE_SUFFIX)) == set(src)
    bus = DiskBus(str(tmp_path / "bus"))
    assert prepublished(bus, "fp8") == 0 and prepublished(bus, "bf16") is None
    created = read_manifest(path).created
    assert publish_v0(_cfg(hf, tmp_path / "bus", "fp8")) == path  # a resubmitted job reuses it
    assert read_manifest(path).created == created


def test_bf16_version_0_and_a_used_bus_is_refused(hf, tmp_path):
    path = publish_v0(_cfg(hf, tmp_path / "bus", "bf16"))
    assert verify(path).precision == "bf16" and "quantization_config" not in json.load(open(f"{path}/config.json"))
    DiskBus(str(tmp_path / "bus")).publish(1, [("x", torch.ones(2))])
    with pytest.raises(ValueError, match=r"already holds versions \[0, 1\]"):
        publish_v0(_cfg(hf, tmp_path / "bus", "bf16"))
