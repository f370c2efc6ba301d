"""The bus against two real local engines (127.0.0.1, stopped by pid): disk and gloo-distributed
updates applied bit for bit, a corrupted version rejected with the old one kept, an older version
refused, and one engine failing -> the fleet ends on one version."""

import asyncio
import json
import os

import pytest
import torch

from rollout.aio import run_sync
from rollout.bus import DiskBus
from rollout.bus.commit import CommitError, begin_session, commit, disk_apply, session_apply
from rollout.bus.sender import DistributedSender
from rollout.config import ClientConfig, LocalEngineConfig, RolloutConfig
from rollout.engines.protocol import EngineHTTPError, sampling_params
from rollout.engines.start import make_fleet, start_engines
from rollout.tiny_model import make_tiny_model

CLIENT = ClientConfig(max_retries=0, retry_backoff_s=0.05, request_timeout_s=120, control_timeout_s=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = make_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=5, init_std=0.2)
    cfg = RolloutConfig(engine="local", precision="fp32", num_engines=2, base_port=0, model_path=model_dir,
                        startup_timeout_s=180, client=CLIENT, local=LocalEngineConfig(batch_wait_ms=1))
    launched = start_engines(cfg, log_dir=str(tmp_path_factory.mktemp("logs")))
    fleet = make_fleet(cfg, launched)
    bus = DiskBus(str(tmp_path_factory.mktemp("bus")), keep=2)
    try:
        yield model_dir, launched, fleet, bus
    finally:
        run_sync(fleet.close())
        launched.stop()


def new_weights(model_dir, seed):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return {n: (p + 0.05 * torch.randn(p.shape, generator=g)).contiguous() for n, p in m.state_dict().items()}


def engine_weights(client, names):
    return {n: torch.tensor(run_sync(client.get_weights_by_name(n, truncate_size=10 ** 6))) for n in names}


def assert_engines_hold(fleet, state):
    for c in fleet.live_clients:
        got = engine_weights(c, list(state))
        for n, t in state.items():
            assert torch.equal(got[n], t), f"{c.url}: {n} differs"


def config_of(model_dir):
    return json.load(open(os.path.join(model_dir, "config.json")))


def test_disk_version_applied_bit_for_bit_on_every_engine(setup):
    model_dir, _, fleet, bus = setup
    state = new_weights(model_dir, 1)
    bus.publish(1, state.items(), config=config_of(model_dir), tokenizer_dir=model_dir)
    rep = run_sync(commit(fleet, 1, disk_apply(bus.path(1), 1)))
    assert sorted(rep.committed) == sorted(fleet.urls) and fleet.committed_version == "1"
    assert run_sync(fleet.weight_versions()) == {u: "1" for u in fleet.urls}
    assert_engines_hold(fleet, state)
    assert os.path.isfile(os.path.join(bus.path(1), "tokenizer.json"))


def test_gloo_distributed_update_applied_bit_for_bit(setup):
    model_dir, _, fleet, bus = setup
    state = new_weights(model_dir, 2)
    failed = run_sync(begin_session(fleet))
    assert failed == {}
    sender = DistributedSender(fleet.live_clients, group_name="test-pp0", backend="gloo", timeout_s=60)
    sender.connect()
    names = list(state)
    for i in range(0, len(names), 5):  # several flattened buckets
        sender.send_bucket([(n, state[n]) for n in names[i:i + 5]])
    assert sender.errors == {}
    sender.close()
    rep = run_sync(commit(fleet, 2, session_apply(2), already_paused=True))
    assert sorted(rep.committed) == sorted(fleet.urls)
    assert_engines_hold(fleet, state)


def test_corrupted_version_is_rejected_and_the_old_one_stays(setup):
    model_dir, _, fleet, bus = setup
    before = engine_weights(fleet.live_clients[0], ["model.norm.weight"])
    state = new_weights(model_dir, 3)
    m = bus.publish(3, state.items(), config=config_of(model_dir), bucket_bytes=1)
    bad = "model.layers.1.mlp.up_proj.weight"
    path = os.path.join(bus.path(3), m.tensors[bad].file)
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CommitError, match="rejected") as err:
        run_sync(commit(fleet, 3, disk_apply(bus.path(3), 3), retries=0))
    # the engines check the manifest's algorithm (the default, xxh3_128)
    assert all(bad in msg and "xxh3_128 checksum" in msg for msg in err.value.errors.values()), err.value.errors
    assert run_sync(fleet.weight_versions()) == {u: "2" for u in fleet.urls}
    assert sorted(fleet.live_urls) == sorted(fleet.urls) and fleet.committed_version == "2"
    after = engine_weights(fleet.live_clients[0], ["model.norm.weight"])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    out = run_sync(fleet.generate([4, 5, 6], sampling_params(max_new_tokens=2)))
    assert out.weight_version == "2"


def test_older_bus_version_is_refused_by_the_engine(setup, tmp_path):
    model_dir, _, fleet, _ = setup
    old = DiskBus(str(tmp_path / "other"), keep=1)
    old.publish(1, new_weights(model_dir, 9).items(), config=config_of(model_dir))
    client = fleet.live_clients[0]
    with pytest.raises(EngineHTTPError, match="older than the running version"):
        run_sync(client.update_weights_from_disk(old.path(1), weight_version="1"))
    assert run_sync(client.weight_version()) == "2"


def test_one_engine_failing_ends_the_fleet_on_one_version(setup):
    model_dir, launched, fleet, bus = setup
    victim = launched.servers[1]
    state = new_weights(model_dir, 4)
    bus.publish(4, state.items(), config=config_of(model_dir))
    victim.kill()
    rep = run_sync(commit(fleet, 4, disk_apply(bus.path(4), 4), retries=1, backoff_s=0.05))
    assert rep.committed == [launched.urls[0]] and list(rep.dropped) == [victim.url]
    assert fleet.live_urls == [launched.urls[0]] and fleet.committed_version == "4"
    async def many():
        return await asyncio.gather(*(fleet.generate([7, 8], sampling_params(max_new_tokens=2)) for _ in range(4)))

    outs = run_sync(many())
    assert {o.weight_version for o in outs} == {"4"}
    assert bus.versions() == [3, 4]  # keep = 2
