"""The local engine answers as SGLang 0.5.23 does: a table of requests shaped as THUDM/slime,
volcengine/verl and SGLang's own tests send them, each with SGLang's status and keys (or error text),
plus the behaviours SGLang's source fixes (rid uniqueness, Bearer scheme, flush refusal, streaming,
one bad request never hurting another). Sources: sglang/api/v1/api_types.py (the schema gate),
srt/sampling/sampling_params.py (verify), srt/entrypoints/http_server.py, srt/utils/auth.py."""

import asyncio
import json

import pytest
from aiohttp import ClientSession

from rollout.engines.local.gate import CONTRACT
from rollout.tiny_model import make_tiny_model
from tests.polling import async_until

from .inproc_engine import InprocEngine

KEY = "k3y"
META = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
        "e2e_latency"}
SLIME_SP = {"temperature": 1.0, "top_p": 0.9, "top_k": -1, "max_new_tokens": 4, "stop": None,
            "stop_token_ids": [2], "skip_special_tokens": True, "no_stop_trim": True,
            "spaces_between_special_tokens": False, "custom_params": {"return_top_p_token_ids": True},
            "sampling_seed": 3}
VERL_SP = {"n": 1, "max_new_tokens": 4, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "repetition_penalty": 1.0, "temperature": 0.8, "top_p": 1.0, "top_k": -1, "ignore_eos": False,
           "skip_special_tokens": True, "spaces_between_special_tokens": True}

# (name, body, status, check): check is the set of meta_info keys (200) or a substring of the error (400)
ACCEPTED = [
    ("slime", {"input_ids": [5, 6, 7], "sampling_params": SLIME_SP, "return_logprob": True}, META),
    ("slime routed experts key (ignored)", {"input_ids": [5, 6], "sampling_params": SLIME_SP,
                                            "return_logprob": True, "return_routed_experts": True}, META),
    ("verl", {"input_ids": [5, 6, 7], "sampling_params": VERL_SP, "return_logprob": True}, META),
    ("sglang test: text greedy", {"text": "ab", "sampling_params": {"temperature": 0, "max_new_tokens": 4}}, META),
    ("sglang test: logprobs with text", {"input_ids": [3, 4, 5], "return_logprob": True, "top_logprobs_num": 2,
                                         "logprob_start_len": 0, "return_text_in_logprobs": True,
                                         "sampling_params": {"max_new_tokens": 3}}, META),
    ("null sampling values mean defaults", {"input_ids": [3, 4], "sampling_params": {
        "temperature": None, "top_p": None, "top_k": None, "max_new_tokens": 2}}, META),
    ("integer temperature", {"input_ids": [3, 4], "sampling_params": {"temperature": 1, "max_new_tokens": 2}}, META),
]
REFUSED = [
    ("typo max_tokens", {"input_ids": [1], "sampling_params": {"max_tokens": 4}}, "unknown field `max_tokens`"),
    ("string max_new_tokens", {"input_ids": [1], "sampling_params": {"max_new_tokens": "4"}},
     'invalid type: string "4", expected i64'),
    ("string temperature", {"input_ids": [1], "sampling_params": {"temperature": "hot"}},
     'invalid type: string "hot", expected f64'),
    ("float token id", {"input_ids": [1, 1.5]}, "invalid type: floating point `1.5`, expected i64"),
    ("sampling_params string", {"input_ids": [1], "sampling_params": "greedy"}, "SamplingParamsOrList"),
    ("stream not a boolean", {"input_ids": [1], "stream": "yes"}, "expected a boolean"),
    ("body is a list", [{"input_ids": [1]}], "expected struct GenerateRequest"),
    ("empty prompt in a batch", {"input_ids": [[]]}, "input_ids cannot be empty."),
    ("empty prompt", {"input_ids": []}, "input_ids cannot be empty."),
    ("no prompt", {"sampling_params": {}}, "Either text, input_ids or input_embeds should be provided."),
    ("top_p -1", {"input_ids": [1], "sampling_params": {"top_p": -1}}, "top_p must be in (0, 1], got -1.0."),
    ("top_p 0", {"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1]"),
    ("min_p 2", {"input_ids": [1], "sampling_params": {"min_p": 2}}, "min_p must be in [0, 1], got 2.0."),
    ("negative temperature", {"input_ids": [1], "sampling_params": {"temperature": -0.5}},
     "temperature must be a non-negative finite number"),
    ("top_k 0", {"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k must be -1 (disable) or at least 1"),
    ("negative max_new_tokens", {"input_ids": [1], "sampling_params": {"max_new_tokens": -1}},
     "max_new_tokens must be at least 0"),
    ("penalty out of range", {"input_ids": [1], "sampling_params": {"frequency_penalty": 3}},
     "frequency_penalty must be in [-2, 2]"),
    ("two grammars", {"input_ids": [1], "sampling_params": {"regex": "a", "ebnf": "b"}}, "Only one of json_schema"),
    ("duplicate rids in a batch", {"input_ids": [[1], [2]], "rid": ["a", "a"]},
     "Duplicate request IDs detected within the request: ['a']"),
    ("n above --max-n", {"input_ids": [1], "sampling_params": {"n": 9}}, "sampling_params.n = 9"),
]


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    model_dir = make_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=3, init_std=0.3)
    e = InprocEngine(model_dir, api_key=KEY, max_n=8)
    yield e
    e.stop()


async def post(url, body, key=KEY, raw=None):
    async with ClientSession(headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as s:
        async with s.post(url + "/generate", data=raw if raw is not None else json.dumps(body)) as r:
            return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("name,body,meta", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_as_sglang_accepts(eng, name, body, meta):
    status, out = asyncio.run(post(eng.url, body))
    assert status == 200, out
    assert isinstance(out["text"], str) and all(isinstance(t, int) for t in out["output_ids"])
    assert meta <= set(out["meta_info"]) <= set(CONTRACT["responses"]["generate_meta_info"]) | {
        "output_token_logprobs", "input_token_logprobs", "output_top_logprobs"}
    m = out["meta_info"]
    assert m["completion_tokens"] == len(out["output_ids"]) and m["prompt_tokens"] >= 1
    if body.get("return_text_in_logprobs"):
        assert all(isinstance(e[2], str) for e in m["output_token_logprobs"])
        assert len(m["output_top_logprobs"]) == len(out["output_ids"])


@pytest.mark.parametrize("name,body,error", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_as_sglang_refuses(eng, name, body, error):
    status, out = asyncio.run(post(eng.url, body))
    assert status == 400
    text = out["error"] if isinstance(out["error"], str) else out["error"]["message"]
    assert error in text


def test_nan_temperature_is_refused(eng):
    status, out = asyncio.run(post(eng.url, None, raw='{"input_ids": [1], "sampling_params": {"temperature": NaN}}'))
    assert status == 400 and "temperature must be a non-negative finite number" in out["error"]["message"]


def test_batch_and_n_answer_lists(eng):
    status, out = asyncio.run(post(eng.url, {"input_ids": [[1, 2], [3, 4]], "sampling_params": [
        {"max_new_tokens": 2}, {"max_new_tokens": 3, "ignore_eos": True}]}))
    assert status == 200 and len(out) == 2 and len(out[1]["output_ids"]) == 3
    status, out = asyncio.run(post(eng.url, {"input_ids": [1, 2], "sampling_params": {"n": 3, "max_new_tokens": 2}}))
    assert status == 200 and len(out) == 3


def test_bearer_scheme_is_case_insensitive(eng):
    body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}

    async def main():
        out = []
        for header in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer {KEY}x", KEY, f"Basic {KEY}"):
            async with ClientSession(headers={"Authorization": header}) as s:
                async with s.post(eng.url + "/generate", json=body) as r:
                    out.append(r.status)
        return out

    assert asyncio.run(main()) == [200, 200, 401, 401, 401]


def test_a_bad_request_never_hurts_another(eng):
    """Concurrent clients: the invalid ones get 400, the valid ones all complete normally."""
    good = {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    bad = [{"input_ids": [1], "sampling_params": {"top_p": -1}}, {"input_ids": [1], "sampling_params": {"min_p": 2}},
           {"input_ids": [[]]}, {"input_ids": [1], "sampling_params": {"temperature": "hot"}}]

    async def main():
        return await asyncio.gather(*([post(eng.url, good) for _ in range(6)] + [post(eng.url, b) for b in bad]))

    res = asyncio.run(main())
    assert [s for s, _ in res[:6]] == [200] * 6
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for _, o in res[:6])
    assert [s for s, _ in res[6:]] == [400] * 4


def test_same_rid_concurrently_is_refused_not_hung(eng):
    long = {"input_ids": [4, 5], "rid": "same", "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}

    async def main():
        first = asyncio.ensure_future(post(eng.url, long))
        await async_until(lambda: "same" in eng.engine.inflight, "the first request to start")
        second = await asyncio.wait_for(post(eng.url, long), 30)
        return await asyncio.wait_for(first, 120), second

    first, second = asyncio.run(main())
    assert first[0] == 200 and second == (400, {"error": {"message": "Duplicate request ID detected: same"}})


def test_stream_as_sglang_streams(eng):
    body = {"input_ids": [3, 4], "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}

    async def main():
        async with ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async with s.post(eng.url + "/generate", json=body) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                return (await r.text()).split("\n\n")

    events = [e for e in asyncio.run(main()) if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    lens = [len(c["output_ids"]) for c in chunks]
    assert lens == sorted(lens) and lens[-1] == 5  # cumulative, as SGLang without --stream-output
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks[-1]["meta_info"]["output_token_logprobs"]) == 5


def test_disconnected_client_is_aborted_and_its_work_dropped(eng):
    body = {"input_ids": [6, 7], "rid": "gone", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}

    async def main():
        task = asyncio.ensure_future(post(eng.url, body))
        await async_until(lambda: "gone" in eng.engine.inflight, "the request to start")
        task.cancel()  # closes the connection
        return await async_until(
            lambda: "gone" not in eng.engine.inflight and eng.scheduler.load() == {"queued": 0, "running": 0},
            "the disconnected request's work to be dropped", timeout_s=10)

    assert asyncio.run(main())


def test_flush_cache_refuses_while_requests_run(eng):
    body = {"input_ids": [6, 8], "rid": "busy", "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}

    async def main():
        async with ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            task = asyncio.ensure_future(post(eng.url, body))
            await async_until(lambda: "busy" in eng.engine.inflight, "the request to start")
            async with s.post(eng.url + "/flush_cache") as r:
                busy = r.status
            await task
            async with s.post(eng.url + "/flush_cache") as r:
                return busy, r.status, await r.text()

    busy, idle, text = asyncio.run(main())
    assert busy == 400 and idle == 200 and text.startswith("Cache flushed.")


def test_model_info_and_update_weight_version_replies(eng):
    async def main():
        async with ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async with s.get(eng.url + "/model_info") as r:
                info = await r.json()
            async with s.post(eng.url + "/update_weight_version", json={"new_version": "7"}) as r:
                reply = await r.json()
            async with s.post(eng.url + "/update_weight_version", json={"new_version": "0"}) as r:
                pass
            return info, reply

    info, reply = asyncio.run(main())
    assert set(info) >= {"model_path", "served_model_name", "tokenizer_path", "is_generation", "weight_version",
                         "load_format", "preferred_sampling_params"}
    assert set(info) <= set(CONTRACT["responses"]["model_info"])
    assert sorted(reply) in CONTRACT["responses"]["update_weight_version"] and reply["new_version"] == "7"


def test_weight_update_refusals_and_the_not_flushed_400(eng, tmp_path):
    """A directory missing tensors and an unpublished bus-named directory are refused (old weights
    kept); a flush_cache update while an in_place-paused request runs loads the weights but answers
    SGLang's 400 'not flushed' and leaves the version unstamped."""
    from safetensors.torch import save_file

    state = {n: t.clone() for n, t in eng.model.model.state_dict().items()}
    new = {n: t + 0.01 for n, t in state.items()}
    missing = dict(new)
    missing.pop(sorted(missing)[0])
    (tmp_path / "partial").mkdir()
    save_file(missing, str(tmp_path / "partial" / "model.safetensors"))
    (tmp_path / "v00000009").mkdir()
    save_file(new, str(tmp_path / "v00000009" / "model.safetensors"))
    (tmp_path / "full").mkdir()
    save_file(new, str(tmp_path / "full" / "model.safetensors"))
    (tmp_path / "orig").mkdir()
    save_file(state, str(tmp_path / "orig" / "model.safetensors"))
    name = sorted(state)[0]

    async def main():
        async with ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async def update(path, **kw):
                async with s.post(eng.url + "/update_weights_from_disk", json={"model_path": str(path), **kw}) as r:
                    return r.status, await r.json()

            res = [await update(tmp_path / "partial", weight_version="5"), await update(tmp_path / "v00000009")]
            unchanged = torch_equal(eng.model.get_weight(name), state[name])
            long = {"input_ids": [5, 9], "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}
            task = asyncio.ensure_future(post(eng.url, long))
            await async_until(lambda: eng.scheduler.load()["running"], "the request to run")
            async with s.post(eng.url + "/pause_generation", json={"mode": "in_place"}) as r:
                assert r.status == 200
            res.append(await update(tmp_path / "full", weight_version="5"))
            loaded = torch_equal(eng.model.get_weight(name), new[name])
            version = eng.engine.weight_version
            async with s.post(eng.url + "/continue_generation", json={}) as r:
                assert r.status == 200
            await task
            res.append(await update(tmp_path / "orig", weight_version="0"))
            return res, unchanged, loaded, version

    (partial, unpublished, not_flushed, restored), unchanged, loaded, version = asyncio.run(main())
    assert partial[0] == 400 and "lacks 1 of the model's" in partial[1]["message"]
    assert unpublished[0] == 400 and "bus-manifest.json" in unpublished[1]["message"]
    assert unchanged
    assert not_flushed[0] == 400 and not_flushed[1]["message"].startswith(
        "Weights were updated, but the cache was not flushed")
    assert loaded and version == "0"  # loaded, not stamped (SGLang: success=False)
    assert restored[0] == 200 and eng.engine.weight_version == "0"


def torch_equal(a, b):
    import torch

    return bool(torch.equal(a, b))


def test_missing_model_directory_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "rollout.engines.local", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "is not a directory" in r.stderr
