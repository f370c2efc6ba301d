"""No token is produced from KV of old weights (issue 15, defect 1), with the prefix cache on.

Prompts sharing a prefix (GRPO-like groups) are generated through the fleet while weight updates
run, by disk and by the gloo-distributed (nccl protocol) path, with requests both running and
queued (max_batch_size 3). Every returned sample tagged version v must have the log-probs of
version v's weights on its tokens (a transformers forward of prompt + output, tolerance 2e-4; KV of
other weights moves them by > 1e-2), and the engine's prefix cache must report no hit on KV from
other weights while it did serve hits. A negative control skips the flush the way the nccl path
did before this fix and shows that the check fails then."""

import asyncio
import json
import os

import pytest
import torch

from rollout.aio import run_sync, submit
from rollout.bus import DiskBus
from rollout.bus.commit import begin_session, commit, disk_apply, session_apply
from rollout.bus.sender import DistributedSender
from rollout.config import ClientConfig
from rollout.engines.client import EngineClient
from rollout.fleet import Fleet
from rollout.tiny_model import make_tiny_model

from .inproc_engine import InprocEngine

CLIENT = ClientConfig(max_retries=0, request_timeout_s=300, control_timeout_s=120)
PARAMS = {"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True}
TOL = 2e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = make_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=7, init_std=0.3)
    eng = InprocEngine(model_dir, weight_version="0", max_batch_size=3)
    fleet = Fleet([EngineClient(eng.url, config=CLIENT)])
    fleet.committed_version = "0"
    bus = DiskBus(str(tmp_path_factory.mktemp("bus")), keep=3)
    yield model_dir, eng, fleet, bus
    run_sync(fleet.close())
    eng.stop()


def perturbed(model_dir, seed):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return {n: (p + 0.05 * torch.randn(p.shape, generator=g)).contiguous() for n, p in m.state_dict().items()}


def reference(model_dir, state):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        m.load_state_dict(state)
    return m


def max_diff(model, prompt, out):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.output_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    ref = lp.gather(1, torch.tensor(out.output_ids)[:, None])[:, 0]
    return float((ref - torch.tensor(out.logprobs)).abs().max())


def prompts(k):
    shared = list(range(10, 40))  # 30 shared tokens, then a short per-sample tail
    return [shared + [50 + (i % 4), 60 + i] for i in range(k)]


async def many(fleet, ps):
    return await asyncio.gather(*(fleet.generate(p, PARAMS) for p in ps))


def in_flight(fleet, eng, ps):
    fut = submit(many(fleet, ps))
    for _ in range(3000):  # until requests run and others queue behind them
        load = eng.scheduler.load()
        if load["running"] and load["queued"]:
            break
        asyncio.run(asyncio.sleep(0.005))
    return fut


def check(models, eng, ps, outs):
    diffs = [max_diff(models[o.weight_version], p, o) for p, o in zip(ps, outs, strict=True)]
    assert max(diffs) < TOL, diffs
    assert eng.model.prefix_cache.stats["stale_hits"] == 0


def test_every_token_of_a_version_comes_from_its_weights(setup):
    model_dir, eng, fleet, bus = setup
    config = json.load(open(os.path.join(model_dir, "config.json")))
    s1, s2 = perturbed(model_dir, 1), perturbed(model_dir, 2)
    models = {"0": reference(model_dir, None), "1": reference(model_dir, s1), "2": reference(model_dir, s2)}
    ps = prompts(12)
    warm = run_sync(many(fleet, ps[:4]))  # fill the cache
    check(models, eng, ps[:4], warm)

    # disk: pause (abort) -> update_weights_from_disk (flush) -> continue + flush -> release
    bus.publish(1, s1.items(), config=config)
    fut = in_flight(fleet, eng, ps)
    run_sync(commit(fleet, 1, disk_apply(bus.path(1), 1)))
    outs = fut.result(300)
    check(models, eng, ps, outs)
    after = run_sync(many(fleet, ps[:6]))
    check(models, eng, ps[:6], after)
    assert {o.weight_version for o in after} == {"1"}

    # nccl protocol over gloo: begin -> buckets (flush_cache false) -> end + version + flush -> release
    fut = in_flight(fleet, eng, ps)
    assert run_sync(begin_session(fleet)) == {}
    sender = DistributedSender(fleet.live_clients, group_name="pc-pp0", backend="gloo", timeout_s=60)
    sender.connect()
    names = list(s2)
    for i in range(0, len(names), 4):
        sender.send_bucket([(n, s2[n]) for n in names[i:i + 4]])
    assert sender.errors == {}
    sender.close()
    run_sync(commit(fleet, 2, session_apply(2), already_paused=True))
    outs = fut.result(300)
    check(models, eng, ps, outs)
    after = run_sync(many(fleet, ps[:6]))
    check(models, eng, ps[:6], after)
    assert {o.weight_version for o in after} == {"2"}
    assert sum(o.cached_tokens for o in after) > 0  # the prefix cache served these prompts
    assert eng.model.prefix_cache.stats["hits"] > 0


def test_negative_control_without_the_flush_stale_kv_is_caught(setup):
    """The check above can fail: load new weights the way the nccl path did before (no flush),
    and a prompt that shares a cached prefix is computed partly from the old weights."""
    model_dir, eng, fleet, _ = setup
    client = fleet.live_clients[0]
    ps = prompts(2)
    run_sync(client.flush_cache())
    before = eng.model.prefix_cache.stats["stale_hits"]
    run_sync(fleet.generate(ps[0], PARAMS))  # caches the shared prefix under the current weights
    state = perturbed(model_dir, 3)
    eng.model.load_tensors(state)  # what an update without flush leaves: new weights, old KV
    out = run_sync(fleet.generate(ps[1], PARAMS))
    assert eng.model.prefix_cache.stats["stale_hits"] > before and out.cached_tokens > 0
    assert max_diff(reference(model_dir, state), ps[1], out) > 10 * TOL
    run_sync(client.flush_cache())
