"""The SGLang protocol subset: request fields exist in 0.5.23, answers are parsed strictly."""

import math

import pytest

from rollout.engines.protocol import (
    GENERATE_FIELDS,
    SAMPLING_FIELDS,
    MalformedResponse,
    generate_payload,
    parse_generate,
    sampling_params,
    update_weights_from_disk_payload,
)

# Field names read from sglang 0.5.23: io_struct.py (GenerateReqInput, UpdateWeightFromDiskReqInput)
# and sampling/sampling_params.py (SamplingParams). A subset: the ones we could plausibly send.
GENERATE_REQ_INPUT_0_5_23 = {
    "rid", "text", "input_ids", "input_embeds", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "stream", "log_metrics",
    "return_hidden_states", "lora_path", "custom_logit_processor", "priority", "session_params",
}
SAMPLING_PARAMS_0_5_23 = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "ignore_eos", "skip_special_tokens", "no_stop_trim", "logit_bias", "sampling_seed",
    "custom_params",
}
UPDATE_FROM_DISK_0_5_23 = {"model_path", "load_format", "abort_all_requests", "weight_version", "is_async",
                           "torch_empty_cache", "keep_pause", "flush_cache", "token_step"}
URL = "http://127.0.0.1:1234"


def test_request_fields_exist_in_the_targeted_release():
    assert set(GENERATE_FIELDS) <= GENERATE_REQ_INPUT_0_5_23
    assert set(SAMPLING_FIELDS) <= SAMPLING_PARAMS_0_5_23
    params = sampling_params(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5, stop=["x"],
                             stop_token_ids=[3], ignore_eos=True, sampling_seed=7)
    body = generate_payload([1, 2, 3], params, rid="r1")
    assert set(body) <= GENERATE_REQ_INPUT_0_5_23
    assert set(body["sampling_params"]) <= SAMPLING_PARAMS_0_5_23
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1 and body["stream"] is False
    upd = update_weights_from_disk_payload("/ckpt", weight_version="3", load_format="safetensors")
    assert set(upd) <= UPDATE_FROM_DISK_0_5_23 and upd["weight_version"] == "3"


def test_unknown_sampling_key_is_refused():
    with pytest.raises(ValueError, match="frequency_penalty"):
        generate_payload([1], {"max_new_tokens": 1, "frequency_penalty": 0.5})


def _answer(ids=(5, 6, 7), lps=(-0.1, -2.0, -0.5), finish=None, version="v3"):
    return {"text": "abc", "output_ids": list(ids),
            "meta_info": {"id": "r1", "finish_reason": finish or {"type": "stop", "matched": 7},
                          "prompt_tokens": 4, "weight_version": version,
                          "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids, strict=True)]}}


def test_parse_aligns_logprobs_with_output_ids():
    out = parse_generate(_answer(), URL)
    assert out.output_ids == [5, 6, 7] and out.logprobs == [-0.1, -2.0, -0.5]
    assert out.finish_reason == "stop" and out.finish_detail["matched"] == 7
    assert out.weight_version == "v3" and out.prompt_tokens == 4 and out.engine == URL
    assert parse_generate(_answer(finish={"type": "length", "length": 3}), URL).finish_reason == "length"


@pytest.mark.parametrize("mutate, needle", [
    (lambda a: a["meta_info"].pop("output_token_logprobs"), "output_token_logprobs missing"),
    (lambda a: a["meta_info"]["output_token_logprobs"].pop(), "2 log-probs for 3 output tokens"),
    (lambda a: a["meta_info"]["output_token_logprobs"][1].__setitem__(0, math.nan), "not a finite"),
    (lambda a: a["meta_info"]["output_token_logprobs"][1].__setitem__(0, -math.inf), "not a finite"),
    (lambda a: a["meta_info"]["output_token_logprobs"][1].__setitem__(0, 0.5), "not a finite log-probability"),
    (lambda a: a["meta_info"]["output_token_logprobs"][2].__setitem__(0, None), "not a finite"),
    (lambda a: a["meta_info"]["output_token_logprobs"][0].__setitem__(1, 99), "for token 99"),
    (lambda a: a["meta_info"].__setitem__("finish_reason", {"type": "weird"}), "finish_reason"),
    (lambda a: a.pop("output_ids"), "output_ids"),
    (lambda a: a.pop("meta_info"), "meta_info"),
])
def test_malformed_answers_raise_naming_the_engine(mutate, needle):
    ans = _answer()
    mutate(ans)
    with pytest.raises(MalformedResponse) as err:
        parse_generate(ans, URL)
    assert URL in str(err.value) and needle in str(err.value) and err.value.engine == URL


def test_logprobs_not_required_when_not_requested():
    ans = _answer()
    ans["meta_info"].pop("output_token_logprobs")
    assert parse_generate(ans, URL, expect_logprobs=False).logprobs is None
