"""Single- and multi-turn generation against a scripted engine (real tokenizer, real sandbox)."""

import asyncio
import logging

import pytest

from rollout.config import MultiTurnConfig, RolloutConfig, SandboxConfig
from rollout.data import Prompt
from rollout.engines.protocol import GenerateOutput
from rollout.generate import RolloutGenerator
from rollout.tiny_model import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("full")


class ScriptedEngine:
    """Answers turn ``k`` of a sample with ``turns[k]`` (text), log-prob -0.1 per token.

    A turn ending in a stop string the request asked for finishes as SGLang does:
    {"type": "stop", "matched": "<the string>"}, the string's tokens included in output_ids.
    """

    def __init__(self, tok, turns, version="v1"):
        self.tok, self.turns, self.version = tok, turns, version
        self.requests = []

    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        self.requests.append((list(input_ids), params))
        turn = self.tok.decode(input_ids).count("```output")  # one per earlier tool turn
        text = self.turns[min(turn, len(self.turns) - 1)]
        ids = self.tok.encode(text, add_special_tokens=False)
        finish = {"type": "length", "length": len(ids)}
        for s in params.get("stop", []):
            if text.endswith(s):
                finish = {"type": "stop", "matched": s}
        if text.endswith("<|im_end|>"):
            finish = {"type": "stop", "matched": ids[-1]}
        ids = ids[: params["max_new_tokens"]]
        if len(ids) == params["max_new_tokens"] and finish["type"] == "stop" and text != self.tok.decode(ids):
            finish = {"type": "length", "length": len(ids)}
        await asyncio.sleep(0)
        return GenerateOutput("scripted", ids, [-0.1] * len(ids), finish["type"], finish, self.version)


def cfg(**mt):
    return RolloutConfig(n_samples=2, max_new_tokens=200, reward="math",
                         multi_turn=MultiTurnConfig(enabled=True, **mt),
                         sandbox=SandboxConfig(timeout_s=10, allow_unisolated_root=True))  # bwrap where present


PROMPT = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
TOOL_TURN = "Let me compute.\n```python\nprint(6*7)\n```\n```output"
FINAL = "The answer is \\boxed{42}.<|im_end|>"


def _prompt(tok, label="42"):
    return Prompt(tok.encode(PROMPT, add_special_tokens=False), PROMPT, label)


def _segments(mask):
    segs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            segs.append((mask[start], i - start))
            start = i
    return segs


def test_tool_call_then_answer_masks_and_logprobs(tok):
    engine = ScriptedEngine(tok, [TOOL_TURN, FINAL])
    gen = RolloutGenerator(engine, tok, cfg())
    samples = asyncio.run(gen.generate([_prompt(tok)]))
    assert len(samples) == 2 and [s.index for s in samples] == [0, 1] and {s.group_id for s in samples} == {0}
    assert samples[0].response_ids == samples[1].response_ids
    s = samples[0]
    n_tool, n_final = (len(tok.encode(t, add_special_tokens=False)) for t in (TOOL_TURN, FINAL))
    obs = tok.encode("\n42\n```\n", add_special_tokens=False)
    assert _segments(s.loss_mask) == [(1, n_tool), (0, len(obs)), (1, n_final)]
    assert s.response_ids[n_tool:n_tool + len(obs)] == obs
    assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.loss_mask)
    assert all(lp == -0.1 for lp, m in zip(s.rollout_logprobs, s.loss_mask) if m == 1)
    assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, s.loss_mask) if m == 0)
    assert s.num_turns == 2 and s.finish_reason == "stop" and s.weight_versions == ["v1", "v1"]
    assert s.metadata["tool_statuses"] == ["ok"] and s.reward == 1.0
    assert "```output\n42\n```\nThe answer is" in s.response_text
    # the second turn's request continued from prompt + model tokens + observation
    second = [ids for ids, _ in engine.requests if len(ids) > len(s.prompt_ids) + n_tool][0]
    assert second == s.prompt_ids + s.response_ids[: n_tool + len(obs)]
    assert "```output" in engine.requests[0][1]["stop"]


def test_turn_limit(tok):
    engine = ScriptedEngine(tok, [TOOL_TURN])  # the model would call the tool forever
    s = asyncio.run(RolloutGenerator(engine, tok, cfg(max_turns=3)).generate([_prompt(tok)]))[0]
    assert s.num_turns == 3 and [m for m, _ in _segments(s.loss_mask)] == [1, 0, 1, 0, 1]
    assert s.metadata["tool_statuses"] == ["ok", "ok"]
    last_stop = [p.get("stop", []) for ids, p in engine.requests if ids[:len(s.prompt_ids)] == s.prompt_ids][-1]
    assert "```output" not in last_stop  # the last turn cannot call the tool
    assert s.reward == 0.0


def test_observation_truncated_to_token_budget(tok):
    turn = "```python\nprint('ab' * 5000)\n```\n```output"
    engine = ScriptedEngine(tok, [turn, FINAL])
    s = asyncio.run(RolloutGenerator(engine, tok, cfg(observation_max_tokens=40)).generate([_prompt(tok)]))[0]
    segs = _segments(s.loss_mask)
    assert segs[1][0] == 0 and segs[1][1] == 40
    start = segs[0][1]
    obs_text = tok.decode(s.response_ids[start:start + 40])
    assert obs_text.startswith("\nabab") and "...[truncated]" in obs_text and obs_text.endswith("\n```\n")


def test_tool_errors_and_timeouts_become_observations(tok):
    engine = ScriptedEngine(tok, ["```python\nwhile True: pass\n```\n```output",
                                  "```python\n1/0\n```\n```output", FINAL])
    c = cfg()
    c.sandbox.timeout_s = 1
    s = asyncio.run(RolloutGenerator(engine, tok, c).generate([_prompt(tok)]))[0]
    assert s.metadata["tool_statuses"] == ["timeout", "error"]
    assert "TimeoutError: execution exceeded 1 s" in s.response_text
    assert "ZeroDivisionError" in s.response_text


def test_response_budget_ends_the_sample(tok):
    engine = ScriptedEngine(tok, [TOOL_TURN])
    c = cfg(max_response_len=80, max_turns=10)
    c.max_new_tokens = 60
    s = asyncio.run(RolloutGenerator(engine, tok, c).generate([_prompt(tok)]))[0]
    assert len(s.response_ids) <= 80 and s.finish_reason == "length"


def test_single_turn_groups_seeds_and_top_p_warning(tok, caplog):
    engine = ScriptedEngine(tok, [FINAL])
    c = RolloutConfig(n_samples=3, max_new_tokens=50, top_p=0.9, reward="math", stop_token_ids=[2])
    caplog.set_level(logging.WARNING, logger="rollout.generate")
    gen = RolloutGenerator(engine, tok, c)
    assert "top_p = 0.9" in caplog.text
    samples = gen.generate_sync([_prompt(tok, "42"), _prompt(tok, "41")], seed=5)
    assert [(s.group_id, s.index) for s in samples] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [s.reward for s in samples] == [1.0] * 3 + [0.0] * 3
    assert all(s.loss_mask == [1] * len(s.response_ids) and s.num_turns == 1 for s in samples)
    params = [p for _, p in engine.requests]
    assert all(p["top_p"] == 0.9 and p["stop_token_ids"] == [2] and "n" in p for p in params)
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 6  # one stable seed per sample
    engine.requests.clear()
    gen.generate_sync([_prompt(tok, "42"), _prompt(tok, "41")], seed=5)
    assert [p["sampling_seed"] for _, p in engine.requests] == seeds
