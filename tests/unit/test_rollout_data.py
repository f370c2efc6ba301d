"""Prompt datasets (JSONL, Parquet), chat template, the overlong policy, the resumable stream."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout.config import DataConfig
from rollout.data import PromptStream, build_prompts, load_prompts, read_records
from rollout.tiny_model import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("full")


RECORDS = [{"prompt": "What is 2+2?", "answer": "4", "source": "a"},
           {"prompt": "x" * 300, "answer": "long", "source": "b"},
           {"prompt": [{"role": "user", "content": "hi"}], "answer": "hello", "source": "c"}]


def test_jsonl_and_parquet_read_the_same(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n")
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS[:2]), pqf)
    assert read_records(str(jl)) == read_records(str(pqf)) == RECORDS[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(str(bad))


def test_chat_template_and_metadata(tok):
    cfg = DataConfig(system_prompt="Be brief.")
    prompts, counts = build_prompts(RECORDS[:1] + RECORDS[2:], tok, cfg)
    assert counts == {"total": 2, "dropped": 0, "truncated": 0}
    p = prompts[0]
    assert p.text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(p.prompt_ids) == p.text and p.label == "4" and p.metadata == {"source": "a"}
    assert prompts[1].text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    raw, _ = build_prompts(RECORDS[:1], tok, DataConfig(apply_chat_template=False))
    assert raw[0].text == "What is 2+2?"
    with pytest.raises(ValueError, match="chat"):
        build_prompts(RECORDS[2:], tok, DataConfig(apply_chat_template=False))


def test_overlong_prompts_dropped_or_truncated_with_a_count(tok, caplog):
    caplog.set_level(logging.WARNING, logger="rollout.data")
    kept, counts = build_prompts(RECORDS, tok, DataConfig(max_prompt_len=64, overlong="drop"))
    assert [p.label for p in kept] == ["4", "hello"] and counts["dropped"] == 1
    assert "1 dropped" in caplog.text
    cut, counts = build_prompts(RECORDS, tok, DataConfig(max_prompt_len=64, overlong="truncate"))
    assert counts["truncated"] == 1 and len(cut) == 3
    assert len(cut[1].prompt_ids) == 64 and cut[1].text.endswith("<|im_start|>assistant\n")


def test_load_prompts_from_config(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q1", "gt": "1"}) + "\n")
    prompts = load_prompts(DataConfig(path=str(path), prompt_key="question", label_key="gt",
                                      apply_chat_template=False), tok)
    assert prompts[0].label == "1" and prompts[0].text == "q1"
    with pytest.raises(KeyError, match="rollout.data.prompt_key"):
        load_prompts(DataConfig(path=str(path)), tok)


def test_prompt_stream_is_resumable(tok):
    prompts, _ = build_prompts([{"prompt": str(i), "answer": i} for i in range(7)], tok,
                               DataConfig(apply_chat_template=False))
    a = PromptStream(prompts, seed=3)
    first = [p.label for p in a.next_batch(5)]
    state = a.state_dict()
    rest = [p.label for p in a.next_batch(6)]  # crosses an epoch boundary
    b = PromptStream(prompts, seed=3)
    b.load_state_dict(state)
    assert [p.label for p in b.next_batch(6)] == rest
    assert sorted(first + rest[:2]) == list(range(7))  # one epoch covers every prompt once
