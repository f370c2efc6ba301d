"""The weight-update requests the bus sends carry only fields of SGLang 0.5.23's io_struct.py."""

from rollout.engines.protocol import (
    generate_payload,
    init_weights_update_group_payload,
    update_weights_from_distributed_payload,
    update_weights_from_tensor_payload,
)

# Read from sglang 0.5.23 srt/managers/io_struct.py.
INIT_GROUP_0_5_23 = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
FROM_DISTRIBUTED_0_5_23 = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
                           "weight_version", "load_format", "selector", "torch_empty_cache"}
FROM_TENSOR_0_5_23 = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
                      "weight_version", "selector", "torch_empty_cache"}


def test_weight_update_payloads_use_release_fields():
    body = init_weights_update_group_payload("10.0.0.1", 29500, 1, 3, "g", "nccl")
    assert set(body) == INIT_GROUP_0_5_23 and body["rank_offset"] == 1
    body = update_weights_from_distributed_payload(["a"], ["bfloat16"], [(2, 3)], "g", weight_version=4)
    assert set(body) <= FROM_DISTRIBUTED_0_5_23
    assert body["load_format"] == "flattened_bucket" and body["shapes"] == [[2, 3]] and body["weight_version"] == "4"
    assert set(update_weights_from_tensor_payload(["x"], weight_version="1")) <= FROM_TENSOR_0_5_23


def test_scoring_request_asks_for_prompt_logprobs():
    body = generate_payload([1, 2, 3, 4], {"max_new_tokens": 1}, logprob_start_len=2)
    assert body["logprob_start_len"] == 2 and body["return_logprob"] is True
