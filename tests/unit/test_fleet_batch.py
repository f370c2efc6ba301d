"""A GRPO group as one batch /generate: Fleet.generate_batch (order, failover, aborted items
re-issued, 4xx raised) and RolloutGenerator sending the same samples as per-sample requests."""

import asyncio
import zlib

import pytest

from rollout.config import RolloutConfig
from rollout.data import Prompt
from rollout.engines.protocol import EngineHTTPError, EngineUnavailable, GenerateOutput, generate_batch_payload
from rollout.fleet import Fleet, FleetExhausted
from rollout.generate import RolloutGenerator


def _answer(url, ids, params, finish="length"):
    """A deterministic output of (prompt, seed): what a seeded engine would sample."""
    h = zlib.crc32(repr((list(ids), params.get("sampling_seed"))).encode())
    toks = [3 + h % 7, 3 + (h // 7) % 7]
    return GenerateOutput(url, toks, [-0.5, -0.25], finish, {"type": finish}, "0")


class BatchEngine:
    """Duck-typed EngineClient with generate and generate_batch; can die, abort or refuse."""

    def __init__(self, url, dead=False):
        self.url, self.dead = url, dead
        self.batches, self.singles, self.abort_items, self.http_error = [], 0, 0, None

    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        self.singles += 1
        return (await self.generate_batch([input_ids], [params]))[0]

    async def generate_batch(self, input_ids, params, *, rids=None, return_logprob=True):
        if self.http_error:
            raise EngineHTTPError(self.url, self.http_error, "scripted")
        if self.dead:
            raise EngineUnavailable(self.url, "connection refused")
        await asyncio.sleep(0.001)
        self.batches.append(len(input_ids))
        outs = []
        for ids, p in zip(input_ids, params, strict=True):
            if self.abort_items:
                self.abort_items -= 1
                outs.append(GenerateOutput(self.url, [1], [-0.5], "abort", {"type": "abort"}, "0"))
            else:
                outs.append(_answer(self.url, ids, p))
        return outs

    async def health(self, timeout_s=5.0):
        return not self.dead

    async def close(self):
        pass


ITEMS = [[5, 6, 7]] * 4
PARAMS = [{"max_new_tokens": 2, "sampling_seed": s} for s in (11, 12, 13, 14)]


def test_batch_is_one_request_in_order():
    eng = BatchEngine("http://a")
    outs = asyncio.run(Fleet([eng]).generate_batch(ITEMS, PARAMS))
    assert eng.batches == [4]
    assert [o.output_ids for o in outs] == [_answer("http://a", i, p).output_ids for i, p in zip(ITEMS, PARAMS,
                                                                                                   strict=True)]


def test_aborted_items_alone_are_reissued():
    eng = BatchEngine("http://a")
    eng.abort_items = 2  # a pause aborted the first two items
    outs = asyncio.run(Fleet([eng]).generate_batch(ITEMS, PARAMS))
    assert eng.batches == [4, 2]
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.output_ids for o in outs] == [_answer("http://a", i, p).output_ids for i, p in zip(ITEMS, PARAMS,
                                                                                                   strict=True)]


def test_a_dead_engine_fails_over_and_a_bad_request_raises():
    dead, live = BatchEngine("http://dead", dead=True), BatchEngine("http://live")

    async def main():
        fleet = Fleet([dead, live])
        outs = [await fleet.generate_batch(ITEMS, PARAMS) for _ in range(3)]
        return fleet, outs

    fleet, outs = asyncio.run(main())
    assert fleet.live_urls == ["http://live"] and sum(live.batches) == 12
    assert all(o.engine == "http://live" for batch in outs for o in batch)
    live.http_error = 400
    with pytest.raises(EngineHTTPError):
        asyncio.run(Fleet([live]).generate_batch(ITEMS, PARAMS))
    with pytest.raises(FleetExhausted):
        asyncio.run(Fleet([BatchEngine("http://x", dead=True)]).generate_batch(ITEMS, PARAMS))


class PerSample:
    """The same engine seen without generate_batch: the generator sends one request per sample."""

    def __init__(self, engine):
        self.generate = engine.generate


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(t) for t in ids)


def test_generator_batches_a_group_into_the_same_samples():
    cfg = RolloutConfig(engine="local", n_samples=4, max_new_tokens=2, reward="synthetic")
    prompts = [Prompt(prompt_ids=[3, 4, 5 + g], text=f"p{g}", label="34") for g in range(3)]
    batched, single = BatchEngine("http://a"), BatchEngine("http://a")
    a = RolloutGenerator(Fleet([batched]), Tok(), cfg).generate_sync(prompts, seed=9)
    b = RolloutGenerator(PerSample(single), Tok(), cfg).generate_sync(prompts, seed=9)
    assert batched.batches == [4, 4, 4] and batched.singles == 0 and single.singles == 12
    assert [(s.group_id, s.index, s.response_ids, s.reward) for s in a] == \
        [(s.group_id, s.index, s.response_ids, s.reward) for s in b]
    assert len({tuple(s.response_ids) for s in a}) > 1  # the per-sample seeds differ inside a group


def test_batch_payload_is_sglangs_list_form():
    body = generate_batch_payload([[1, 2], [3]], [{"max_new_tokens": 1}, {"max_new_tokens": 2}], ["a", "b"])
    assert body["input_ids"] == [[1, 2], [3]] and body["rid"] == ["a", "b"]
    assert body["sampling_params"] == [{"max_new_tokens": 1}, {"max_new_tokens": 2}]
    assert body["return_logprob"] is True and body["stream"] is False
    with pytest.raises(ValueError, match="as many"):
        generate_batch_payload([[1]], [], ["a"])
    # SGLang 0.5.23's /generate schema gate and SamplingParams.verify accept it (the committed contract)
    from rollout.engines.local.gate import contract_error, normalize_sampling
    from rollout.engines.protocol import sampling_params

    params = [sampling_params(max_new_tokens=4, temperature=0.7, stop=["x"], sampling_seed=s) for s in (1, 2)]
    body = generate_batch_payload([[1, 2], [1, 2]], params, ["a", "b"])
    assert contract_error(body) is None, body
    for p in body["sampling_params"]:
        normalize_sampling(p, vocab_size=1000)


def test_client_checks_a_batch_answer(monkeypatch):
    from rollout.engines.client import EngineClient
    from rollout.engines.protocol import MalformedResponse

    one = {"output_ids": [4], "meta_info": {"finish_reason": {"type": "length"}, "weight_version": "0",
                                            "output_token_logprobs": [[-0.1, 4, None]]}}
    answers = []

    async def fake_request(self, method, path, *, json=None, **kw):
        assert path == "/generate" and len(json["input_ids"]) == len(json["rid"])
        return answers.pop(0)

    monkeypatch.setattr(EngineClient, "_request", fake_request)
    c = EngineClient("http://x")
    answers[:] = [one, [one, one]]
    assert [o.output_ids for o in asyncio.run(c.generate_batch([[1]], [{"max_new_tokens": 1}]))] == [[4]]
    assert len(asyncio.run(c.generate_batch([[1], [2]], [{"max_new_tokens": 1}] * 2))) == 2
    answers[:] = [[one]]
    with pytest.raises(MalformedResponse, match="batch /generate of 2 prompts answered a list of 1"):
        asyncio.run(c.generate_batch([[1], [2]], [{"max_new_tokens": 1}] * 2))
