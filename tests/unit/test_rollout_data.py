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
    assert p.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
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


VERL = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "data_source": "d", "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 0}}]


def test_dotted_label_key_reads_verl_records_and_missing_labels_fail(tok, tmp_path):
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(VERL), path)
    cfg = DataConfig(path=str(path), label_key="reward_model.ground_truth")
    (p,) = load_prompts(cfg, tok)
    assert p.label == "4" and p.metadata["data_source"] == "d"
    with pytest.raises(KeyError, match="record 0 has no 'answer' field .*reward_model.ground_truth"):
        load_prompts(DataConfig(path=str(path)), tok)  # the default label_key: no silent zero reward
    (p,) = load_prompts(DataConfig(path=str(path), require_label=False), tok)
    assert p.label is None


def test_instruction_is_prepended_to_the_user_message(tok):
    from rollout.prompts import SIMPLETIR

    (p,), _ = build_prompts(VERL, tok, DataConfig(label_key="reward_model.ground_truth", instruction="simpletir"))
    assert p.text == f"<|im_start|>user\n{SIMPLETIR}What is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert SIMPLETIR.startswith("Solve the following problem step by step.") and SIMPLETIR.endswith("User Question:\n")
    (p,), _ = build_prompts(RECORDS[:1], tok, DataConfig(instruction="Q: "))
    assert "<|im_start|>user\nQ: What is 2+2?<|im_end|>" in p.text


def _converter():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_data.py")
    spec = importlib.util.spec_from_file_location("convert_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convert_data_from_verl_and_hf_dumps(tok, tmp_path, capsys):
    conv = _converter()
    pq.write_table(pa.Table.from_pylist(VERL), tmp_path / "verl.parquet")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "train.jsonl").write_text(
        json.dumps({"problem": "Sum 1..3? Let's think step by step.", "answer": "6"}) + "\n"
        + json.dumps({"question": "Half of 3?", "solution": "It is \\boxed{\\frac{3}{2}}."}) + "\n")
    out = tmp_path / "ours.jsonl"
    assert conv.main([str(tmp_path / "verl.parquet"), str(hf), "--out", str(out),
                      "--strip", "Let's think step by step."]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["4", "6", "\\frac{3}{2}"]
    assert rows[0]["prompt"] == VERL[0]["prompt"] and rows[0]["data_source"] == "d"
    assert rows[1]["prompt"] == [{"role": "user", "content": "Sum 1..3?"}]
    prompts = load_prompts(DataConfig(path=str(out)), tok)  # the defaults read the output
    assert [p.label for p in prompts] == ["4", "6", "\\frac{3}{2}"]
    (hf / "bad.json").write_text(json.dumps([{"problem": "no answer here"}]))
    with pytest.raises(SystemExit, match="bad.json: record 0 has no answer"):
        conv.main([str(hf), "--out", str(out)])
    assert conv.main([str(hf), "--out", str(tmp_path / "o.parquet"), "--skip-unlabeled"]) == 0
    assert "1 without question or answer skipped" in capsys.readouterr().out
