"""Every request the client builds is valid for SGLang 0.5.23, judged by the contract data extracted
from the wheel (rollout/engines/sglang_contract.json, tools/sglang_contract.py): routes and methods,
the /generate schema gate and SamplingParams.verify, and the fields of each control request."""

import asyncio

import pytest

from rollout.engines.client import EngineClient
from rollout.engines.local.gate import CONTRACT, contract_error, normalize_sampling
from rollout.engines.protocol import sampling_params

STRUCT = {"/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
          "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
          "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
          "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
          "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
          "/update_weight_version": "UpdateWeightVersionReqInput", "/get_weights_by_name": "GetWeightsByNameReqInput",
          "/pause_generation": "PauseGenerationReqInput", "/continue_generation": "ContinueGenerationReqInput",
          "/abort_request": "AbortReq"}
GENERATE_REPLY = {"text": "", "output_ids": [1, 2], "meta_info": {
    "id": "r", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3, "completion_tokens": 2,
    "weight_version": "0", "output_token_logprobs": [[-0.5, 1, None], [-0.25, 2, None]],
    "input_token_logprobs": [[-1.0, 2, None], [-1.0, 3, None], [-1.0, 4, None]]}}


def record_client(monkeypatch):
    sent = []

    async def fake(self, method, path, *, json=None, timeout_s, retries=None, expect_json=True, retry_timeouts=True):
        sent.append((method, path, json))
        if path == "/generate":
            return GENERATE_REPLY
        if path in ("/model_info", "/server_info"):
            return {"weight_version": "0", "tp_size": 1}
        if path == "/get_weights_by_name":
            return [[0.0]]
        return {"success": True, "message": "ok"} if expect_json else "ok"

    monkeypatch.setattr(EngineClient, "_request", fake)
    return sent


def test_every_client_request_matches_the_contract(monkeypatch):
    sent = record_client(monkeypatch)

    async def main():
        c = EngineClient("http://engine")
        params = sampling_params(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=20, stop=["x"],
                                 stop_token_ids=[2], ignore_eos=True, no_stop_trim=True, sampling_seed=1)
        await c.generate([1, 2, 3], params, rid="r")
        await c.generate([1, 2, 3], sampling_params(max_new_tokens=1), return_logprob=False)
        await c.prompt_logprobs([1, 2, 3, 4], 1)
        await c.abort("r")
        await c.abort(abort_all=True)
        await c.health()
        await c.health_generate()
        await c.model_info()
        await c.server_info()
        for mode in ("abort", "retract", "in_place"):
            await c.pause_generation(mode)
        await c.continue_generation()
        await c.flush_cache()
        await c.update_weights_from_disk("/ckpt/v1", weight_version="1", flush_cache=False)
        await c.init_weights_update_group("127.0.0.1", 29500, 1, 2, "g", "nccl")
        await c.begin_weight_update()
        await c.update_weights_from_distributed(["w"], ["bfloat16"], [[2, 2]], "g", weight_version="1")
        await c.update_weights_from_tensor(["abc"], weight_version="1")
        await c.end_weight_update()
        await c.update_weight_version("1")
        await c.get_weights_by_name("w")
        await c.destroy_weights_update_group("g")

    asyncio.run(main())
    routes = CONTRACT["routes"]
    base = set(CONTRACT["io_struct"]["BaseReq"])
    assert len({p for _, p, _ in sent}) == 18  # every route the client uses
    for method, path, body in sent:
        assert path in routes and method in routes[path], f"{method} {path} is not an SGLang route"
        if path == "/generate":
            assert contract_error(body) is None, body
            normalize_sampling(body.get("sampling_params") or {}, vocab_size=1000)
        elif path in STRUCT:
            fields = set(CONTRACT["io_struct"][STRUCT[path]]) | base
            assert set(body or {}) <= fields, f"{path}: {sorted(set(body) - fields)} not in {STRUCT[path]}"
        else:
            assert not body, f"{path} takes no body"


def test_the_gate_refuses_what_sglang_refuses():
    """The data-driven gate itself: a few hand-checked verdicts of api_types.py's decoders."""
    assert contract_error({"input_ids": [1], "sampling_params": {"max_new_tokens": 4}}) is None
    assert "unknown field `max_tokens`, expected one of `max_new_tokens`" in \
        contract_error({"input_ids": [1], "sampling_params": {"max_tokens": 4}})
    assert contract_error({"input_ids": [1], "sampling_params": {"max_new_tokens": True}}) == \
        "invalid type: boolean `true`, expected i64"
    assert contract_error({"input_ids": [[1], [2, 3.0]]}) == "invalid type: floating point `3.0`, expected i64"
    assert contract_error({"input_ids": [[]]}) is None  # the schema admits it; SGLang's ValueError refuses it
    assert contract_error({"input_ids": [1], "max_thinking_tokens": -1}) == \
        "invalid value: integer `-1`, expected u64"
    assert contract_error({"input_ids": [1], "not_a_field": {"x": 1}}) is None  # unknown top-level keys ignored
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5."):
        normalize_sampling({"top_p": 1.5}, 100)
    assert normalize_sampling({"temperature": 0}, 100)["top_k"] == 1  # greedy, as SamplingParams.__post_init__
