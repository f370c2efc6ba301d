"""Evaluation: avg@n and unbiased pass@k against hand-computed values and a brute-force count,
benchmark files through the registry, the written tables and samples, single- and multi-turn
generation with a scripted engine (no engine process)."""

import asyncio
import csv
import itertools
import json
import math

import pytest

from rollout.config import DataConfig, MultiTurnConfig, RolloutConfig
from rollout.engines.protocol import GenerateOutput
from rollout.eval.benchmarks import load_benchmark, lookup, parse_dataset
from rollout.eval.config import EvalConfig
from rollout.eval.metrics import pass_at_k, report_ks, summarize
from rollout.eval.runner import evaluate, write_report
from rollout.tiny_model import make_tiny_model


def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) that hold a correct one."""
    subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k,want", [(4, 1, 2, 0.5), (5, 2, 3, 0.9), (4, 0, 1, 0.0), (4, 4, 1, 1.0),
                                        (8, 2, 1, 0.25), (3, 1, 3, 1.0)])
def test_pass_at_k_hand_values(n, c, k, want):
    # e.g. n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(64, 3, 8) == pytest.approx(1 - math.comb(61, 8) / math.comb(64, 8), rel=1e-12)


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="pass@5 needs 1 <= k <= n = 4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="eval.pass_k"):
        EvalConfig(n=4, pass_k=[8]).validate()


def test_summarize_hand_computed():
    # two problems, n = 4: correct counts 1 and 3; one truncated sample
    r = summarize("toy", [[1, 0, 0, 0], [1, 1, 0.5, 1]], [[2, 4, 6, 8], [1, 1, 1, 1]],
                  [[False, False, False, True], [False] * 4])
    assert r.problems == 2 and r.samples == 8 and r.n == 4
    assert r.avg_at_n == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert r.pass_at[1] == pytest.approx((0.25 + 0.75) / 2)
    assert r.pass_at[2] == pytest.approx((0.5 + 1.0) / 2)
    assert r.pass_at[4] == pytest.approx(1.0)
    assert r.reward_mean == pytest.approx(4.5 / 8) and r.mean_response_len == pytest.approx(24 / 8)
    assert r.truncation_rate == pytest.approx(1 / 8)
    assert report_ks(4) == [1, 2, 4] and report_ks(6) == [1, 2, 4, 6]
    assert set(r.scalars()) >= {"eval/toy/avg@4", "eval/toy/pass@1", "eval/toy/pass@2", "eval/toy/pass@4"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=1)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_registry_fields_and_errors(tmp_path, tokenizer):
    data = DataConfig(apply_chat_template=False, max_prompt_len=512)
    olymp = write_jsonl(tmp_path / "olympiadbench.jsonl", [{"question": "1+1?", "final_answer": ["2"]}])
    name, prompts, dropped = load_benchmark(olymp, tokenizer, data)
    assert name == "olympiadbench" and prompts[0].label == "2" and dropped == 0
    # verl format: chat-message prompt, dotted ground truth; the alias names the registry entry
    verl = tmp_path / "m.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "reward_model": {"ground_truth": "4"}}]), verl)
    name, prompts, _ = load_benchmark(f"math-500={verl}", tokenizer, data)
    assert name == "math500" and prompts[0].label == "4"
    # a file without the fields its entry names: one line naming the fields it has
    bad = write_jsonl(tmp_path / "aime24.jsonl", [{"q": "x", "a": "1"}])
    with pytest.raises(ValueError, match=r"benchmark 'aime2024' needs a field for its prompt.*\['a', 'q'\]"):
        load_benchmark(bad, tokenizer, data)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_benchmark(str(tmp_path / "missing.jsonl"), tokenizer, data)
    # a user's own benchmark by field mapping; too-long prompts dropped and counted
    own = write_jsonl(tmp_path / "own.jsonl",
                      [{"q": "3+3?", "sol": {"final": "6"}}, {"q": "9" * 600, "sol": {"final": "1"}}])
    name, prompts, dropped = load_benchmark(f"mine={own}", tokenizer, data, prompt_key="q", label_key="sol.final")
    assert name == "mine" and [p.label for p in prompts] == ["6"] and dropped == 1
    assert parse_dataset("a/b/aime25.parquet") == ("aime25", "a/b/aime25.parquet")
    assert lookup({"a": {"b": 1}}, "a.b") == 1


class ScriptedEngine:
    """Answers with a fixed script per (prompt text, sample index): no engine process."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    async def generate(self, input_ids, params, rid=None):
        text = self.tokenizer.decode(input_ids, skip_special_tokens=True)
        self.calls.append(text)
        reply, finish, matched = self.script(text, params)
        ids = self.tokenizer.encode(reply, add_special_tokens=False)
        return GenerateOutput(output_ids=ids, logprobs=[-0.5] * len(ids), finish_reason=finish, weight_version="0",
                              engine="scripted",
                              finish_detail={"type": finish, "matched": matched}, text=reply)


def test_single_turn_tables_and_samples(tmp_path, tokenizer):
    bench = write_jsonl(tmp_path / "math500.jsonl", [{"problem": "1+1=", "answer": "2"},
                                                     {"problem": "2+3=", "answer": "5"}])
    counter = {}

    def script(text, params):  # problem "1+1": 2 of 4 right; "2+3": 1 of 4 right, one truncated
        key = "a" if "1+1" in text else "b"
        i = counter[key] = counter.get(key, -1) + 1
        if key == "a":
            return ("\\boxed{2}" if i < 2 else "\\boxed{3}"), "stop", None
        return ("\\boxed{5}" if i == 0 else "\\boxed{7}"), ("length" if i == 3 else "stop"), None

    rollout = RolloutConfig(reward="math", data=DataConfig(apply_chat_template=False))
    ev = EvalConfig(datasets=[bench], n=4, temperature=0.7)
    runs = asyncio.run(evaluate(ScriptedEngine(tokenizer, script), tokenizer, rollout, ev))
    r = runs[0].result
    assert r.name == "math500" and r.problems == 2 and r.samples == 8
    assert r.avg_at_n == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert r.pass_at[1] == pytest.approx(0.375)
    assert r.pass_at[2] == pytest.approx(((1 - 1 / 6) + 0.5) / 2)  # c=2: 1 - C(2,2)/C(4,2); c=1: 1 - C(3,2)/C(4,2)
    assert r.truncation_rate == pytest.approx(1 / 8)
    paths = write_report(runs, str(tmp_path / "out"))
    md = open(paths["results.md"]).read()
    assert "| math500 | 2 | 8 | 37.50 |" in md
    rows = list(csv.DictReader(open(paths["results.csv"])))
    assert float(rows[0]["pass@4"]) == pytest.approx(1.0) and float(rows[0]["avg@4"]) == pytest.approx(0.375)
    samples = [json.loads(line) for line in open(paths["samples.jsonl"])]
    assert len(samples) == 8 and sum(s["correct"] for s in samples) == 3
    assert {s["finish_reason"] for s in samples} == {"stop", "length"}


def test_multi_turn_with_a_tool_call(tmp_path, tokenizer):
    bench = write_jsonl(tmp_path / "tool.jsonl", [{"problem": "6*7=", "answer": "42"}])

    def script(text, params):
        if "Code execution result: " not in text:  # first turn: a closed code block (docs/tir.md)
            return "```python\nprint(6*7)\n```", "stop", "```"
        return ("\\boxed{42}" if "42" in text.split("Code execution result: ")[-1] else "\\boxed{0}"), "stop", None

    rollout = RolloutConfig(reward="math", data=DataConfig(apply_chat_template=False),
                            multi_turn=MultiTurnConfig(enabled=True, max_turns=3, max_response_len=256))
    ev = EvalConfig(datasets=[bench], n=2)
    runs = asyncio.run(evaluate(ScriptedEngine(tokenizer, script), tokenizer, rollout, ev))
    r, samples = runs[0].result, runs[0].samples
    assert all(s.num_turns == 2 for s in samples), [s.response_text for s in samples]
    assert all(s.metadata["tool_statuses"] == ["ok"] for s in samples)
    assert r.avg_at_n == 1.0 and r.pass_at[2] == 1.0  # the answer needed the tool's output
