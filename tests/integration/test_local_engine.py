"""The local CPU engine over real HTTP (127.0.0.1): batching, log-prob semantics, control endpoints.

One engine process serves the module; it is started by pid through the launcher and stopped in
teardown.
"""

import asyncio
import time

import pytest
import torch
from aiohttp import ClientSession

from rollout.config import ClientConfig, LocalEngineConfig, RolloutConfig
from rollout.data import Prompt
from rollout.engines.client import EngineClient
from rollout.engines.protocol import EngineHTTPError, sampling_params
from rollout.engines.start import make_fleet, start_engines
from rollout.generate import RolloutGenerator
from rollout.tiny_model import make_tiny_model

KEY = "test-key"
CLIENT = ClientConfig(max_retries=1, retry_backoff_s=0.05, request_timeout_s=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), init_std=0.3, seed=2, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def cfg(model_dir):
    return RolloutConfig(engine="local", precision="fp32", base_port=0, api_key=KEY, model_path=model_dir,
                         startup_timeout_s=180, client=CLIENT,
                         local=LocalEngineConfig(max_batch_size=16, batch_wait_ms=20))


@pytest.fixture(scope="module")
def engine(cfg, tmp_path_factory):
    launched = start_engines(cfg, log_dir=str(tmp_path_factory.mktemp("logs")))
    try:
        yield launched
    finally:
        launched.stop()


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def client(engine, key=KEY):
    return EngineClient(engine.urls[0], api_key=key, config=CLIENT)


def ref_logprobs(model, prompt, output, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, -1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(output)[:, None])[:, 0].tolist()


def test_concurrent_requests_are_batched(engine):
    prompts = [[5 + i, 6, 7 + (i % 5)] * (1 + i % 3) for i in range(16)]

    async def main():
        async with client(engine) as c:
            outs = await asyncio.gather(*(c.generate(p, sampling_params(max_new_tokens=12, ignore_eos=True,
                                                                        sampling_seed=i))
                                          for i, p in enumerate(prompts)))
            return outs, await c.server_info()

    outs, info = asyncio.run(main())
    assert len(outs) == 16
    for o in outs:
        assert len(o.output_ids) == 12 == len(o.logprobs) and o.finish_reason == "length"
        assert o.engine == engine.urls[0] and o.weight_version == "0"
    state = info["internal_states"][0]
    assert state["max_batch_seen"] >= 4, state  # concurrent requests shared decode steps


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, -1), (0.7, 1.0, -1), (1.3, 0.8, 20)])
def test_logprobs_equal_a_transformers_forward(engine, hf, temperature, top_p, top_k):
    prompts = [[11, 12, 13, 14], [20, 30, 40], [7] * 9]

    async def main():
        async with client(engine) as c:
            params = [sampling_params(max_new_tokens=16, temperature=temperature, top_p=top_p, top_k=top_k,
                                      ignore_eos=True, sampling_seed=42 + i) for i in range(len(prompts))]
            return await asyncio.gather(*(c.generate(p, q) for p, q in zip(prompts, params, strict=True)))

    for prompt, out in zip(prompts, asyncio.run(main()), strict=True):
        ref = ref_logprobs(hf, prompt, out.output_ids, temperature)
        assert out.logprobs == pytest.approx(ref, abs=2e-4)
        # the same numbers at T = 1 would be different: the temperature is in the log-prob
        if temperature != 1.0:
            assert out.logprobs != pytest.approx(ref_logprobs(hf, prompt, out.output_ids, 1.0), abs=1e-2)


def test_sampling_seed_reproduces(engine):
    async def main():
        async with client(engine) as c:
            p = sampling_params(max_new_tokens=10, ignore_eos=True, sampling_seed=7)
            return [await c.generate([9, 9, 9], p) for _ in range(2)]

    a, b = asyncio.run(main())
    # the second request reuses the first one's prompt KV (prefix cache): equal up to float reassociation
    assert a.output_ids == b.output_ids and b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def test_bad_requests_are_refused(engine):
    async def main():
        async with client(engine) as c:
            with pytest.raises(EngineHTTPError, match="400"):
                await c.generate([10 ** 6], sampling_params(max_new_tokens=2))
        async with ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "frequency_penalty": 0.5}}
            async with s.post(engine.urls[0] + "/generate", json=body) as r:
                assert r.status == 400 and "frequency_penalty" in await r.text()

    asyncio.run(main())


async def _engine_state(c, until, timeout_s: float = 60.0):
    """Poll the engine's scheduler state (/get_server_info ``internal_states[0]``: the local engine's
    ``queued``/``running``/``paused`` and counters) until ``until(state)``, with a deadline. SGLang
    0.5.23 shows no queue there (a request sent while paused waits in its tokenizer manager, where
    no route sees it), so this observable is the local engine's own."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = (await c.server_info())["internal_states"][0]
        if until(state):
            return state
        assert time.monotonic() < deadline, f"engine state never matched: {state}"
        await asyncio.sleep(0.02)


def test_pause_continue_and_abort(engine):
    async def main():
        async with client(engine) as c:
            await c.pause_generation("in_place")
            held = asyncio.ensure_future(c.generate([3, 4], sampling_params(max_new_tokens=4)))
            # held while paused: the request reached the engine's queue and nothing runs it
            state = await _engine_state(c, lambda s: s["queued"] == 1)
            assert state["paused"] and state["running"] == 0 and not held.done()
            await c.continue_generation()
            out = await held
            assert out.finish_reason in ("length", "stop")
            before = (await _engine_state(c, lambda s: s["queued"] == s["running"] == 0))["generated_tokens"]
            long = asyncio.ensure_future(c.generate([3, 4], sampling_params(max_new_tokens=3000, ignore_eos=True),
                                                    rid="to-abort"))
            # aborted while it runs: once it is in the batch with at least one generated token
            await _engine_state(c, lambda s: s["running"] == 1 and s["generated_tokens"] > before)
            await c.abort("to-abort")
            return await long

    out = asyncio.run(main())
    assert out.finish_reason == "abort" and 0 < len(out.output_ids) < 3000
    assert len(out.logprobs) == len(out.output_ids)


def test_weight_update_needs_the_key_and_moves_the_version(engine, hf, model_dir, tmp_path):
    new = type(hf).from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    new.save_pretrained(str(tmp_path / "v1"), safe_serialization=True)
    prompt = [15, 16, 17]

    async def main():
        async with client(engine, key=None) as anon:
            with pytest.raises(EngineHTTPError, match="401"):
                await anon.update_weights_from_disk(str(tmp_path / "v1"), weight_version="1")
            assert await anon.health()  # health stays open
        async with client(engine) as c:
            res = await c.update_weights_from_disk(str(tmp_path / "v1"), weight_version="1")
            assert res["success"] and await c.weight_version() == "1"
            out = await c.generate(prompt, sampling_params(max_new_tokens=8, ignore_eos=True, sampling_seed=1))
            await c.update_weights_from_disk(model_dir, weight_version="0")  # restore for other tests
            return out

    out = asyncio.run(main())
    assert out.weight_version == "1"
    assert out.logprobs == pytest.approx(ref_logprobs(new, prompt, out.output_ids, 1.0), abs=2e-4)
    assert out.logprobs != pytest.approx(ref_logprobs(hf, prompt, out.output_ids, 1.0), abs=1e-3)


def test_generator_over_a_fleet_end_to_end(engine, cfg, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    gcfg = RolloutConfig(n_samples=4, max_new_tokens=6, temperature=1.0, reward="synthetic",
                         api_key=KEY, client=CLIENT)
    prompts = [Prompt(tok.encode(f"c:{d}="), f"c:{d}=", d) for d in ("123", "907")]

    async def main():
        async with make_fleet(gcfg, engine) as fleet:
            return await RolloutGenerator(fleet, tok, gcfg).generate(prompts, seed=3)

    samples = asyncio.run(main())
    assert [(s.group_id, s.index) for s in samples] == [(g, i) for g in range(2) for i in range(4)]
    for s in samples:
        assert 1 <= len(s.response_ids) <= 6 and len(s.rollout_logprobs) == len(s.response_ids)
        assert s.loss_mask == [1] * len(s.response_ids) and s.weight_version == "0"
        assert all(lp <= 0 for lp in s.rollout_logprobs) and 0.0 <= s.reward <= 1.0


def test_a_batch_request_serves_each_item_as_its_own_request(engine, hf):
    """generate_batch (SGLang's list form): per-item seeds and params, answers in order, the same
    samples as one request per item, log-probs those of the model."""
    prompt = [5, 6, 7, 8]
    params = [sampling_params(max_new_tokens=5, ignore_eos=True, sampling_seed=s, temperature=t)
              for s, t in ((1, 1.0), (2, 1.0), (1, 1.0), (3, 0.7))]

    async def main():
        async with client(engine) as c:
            batch = await c.generate_batch([prompt] * 4, params, rids=[f"b{i}" for i in range(4)])
            singles = [await c.generate(prompt, p) for p in params]
            return batch, singles

    batch, singles = asyncio.run(main())
    assert [o.output_ids for o in batch] == [o.output_ids for o in singles]
    assert batch[0].output_ids == batch[2].output_ids  # the same seed, the same sample
    assert batch[0].output_ids != batch[1].output_ids or batch[0].output_ids != batch[3].output_ids
    for o, p in zip(batch, params, strict=True):
        assert o.logprobs == pytest.approx(ref_logprobs(hf, prompt, o.output_ids, p["temperature"]), abs=1e-4)
