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
    """Writes turn ``k`` of a sample from ``turns[k]`` (text), log-prob -0.1 per token, as SGLang would.

    The turn index is the number of observations in the request so far; the longest end of the
    request's text that begins the turn is what the turn already wrote (a continuation after an
    opening fence). The
    output runs to the first stop string in the *new* text (SGLang checks only generated text),
    finishing {"type": "stop", "matched": "<the string>"} with its tokens included, or to
    ``<|im_end|>`` (a stop token), or to ``max_new_tokens`` ({"type": "length"}).
    """

    def __init__(self, tok, turns, version="v1"):
        self.tok, self.turns, self.version = tok, turns, version
        self.requests = []

    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        self.requests.append((list(input_ids), params))
        text = self.tok.decode(input_ids)[len(PROMPT):]
        turn = text.count("Code execution result: ")
        script = self.turns[min(turn, len(self.turns) - 1)]
        done = next(n for n in range(min(len(text), len(script)), -1, -1) if text.endswith(script[:n]))
        rest = script[done:]
        hits = [(rest.find(s) + len(s), s) for s in params.get("stop", []) if s in rest]
        end, matched = min(hits) if hits else (len(rest), None)
        out = rest[:end]
        finish = {"type": "stop", "matched": matched} if matched else {"type": "length", "length": len(out)}
        ids = self.tok.encode(out, add_special_tokens=False)
        if not matched and out.endswith("<|im_end|>"):
            finish = {"type": "stop", "matched": ids[-1]}
        if len(ids) > params["max_new_tokens"]:
            ids, finish = ids[: params["max_new_tokens"]], {"type": "length", "length": params["max_new_tokens"]}
        await asyncio.sleep(0)
        return GenerateOutput("scripted", ids, [-0.1] * len(ids), finish["type"], finish, self.version)


def cfg(**mt):
    return RolloutConfig(n_samples=2, max_new_tokens=200, reward="math", reward_workers=0,
                         multi_turn=MultiTurnConfig(enabled=True, **mt),
                         sandbox=SandboxConfig(timeout_s=10, allow_unisolated_root=True))  # bwrap where present


PROMPT = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
TOOL_TURN = "Let me compute.\n```python\nprint(6*7)\n```"
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


def _run(tok, turns, c=None):
    engine = ScriptedEngine(tok, turns)
    return asyncio.run(RolloutGenerator(engine, tok, c or cfg()).generate([_prompt(tok)]))[0], engine


def test_tool_call_then_answer_masks_and_logprobs(tok):
    engine = ScriptedEngine(tok, [TOOL_TURN, FINAL])
    gen = RolloutGenerator(engine, tok, cfg())
    samples = asyncio.run(gen.generate([_prompt(tok)]))
    assert len(samples) == 2 and [s.index for s in samples] == [0, 1] and {s.group_id for s in samples} == {0}
    assert samples[0].response_ids == samples[1].response_ids
    s = samples[0]
    n_tool, n_final = (len(tok.encode(t, add_special_tokens=False)) for t in (TOOL_TURN, FINAL))
    obs = tok.encode("\nCode execution result: 42\n", add_special_tokens=False)
    assert _segments(s.loss_mask) == [(1, n_tool), (0, len(obs)), (1, n_final)]
    assert s.response_ids[n_tool:n_tool + len(obs)] == obs
    assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.loss_mask)
    assert all(lp == -0.1 for lp, m in zip(s.rollout_logprobs, s.loss_mask, strict=True) if m == 1)
    assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, s.loss_mask, strict=True) if m == 0)
    assert s.num_turns == 2 and s.finish_reason == "stop"
    assert s.metadata["tool_statuses"] == ["ok"] and s.reward == 1.0
    assert "```\nCode execution result: 42\nThe answer is" in s.response_text
    # turn 1 took two requests (stopped on the opening fence, continued to the closing one); the
    # continuation and the second turn extend the previous tokens exactly (no re-tokenization)
    mine = [ids for ids, _ in engine.requests]
    assert len(engine.requests) == 6
    assert all(r == s.prompt_ids + s.response_ids[: len(r) - len(s.prompt_ids)] for r in mine)
    assert all("```" in p["stop"] for _, p in engine.requests)


@pytest.mark.parametrize("fence", ["```py", "```python3", "```", "```python "])
def test_usual_fence_spellings_run(tok, fence):
    s, _ = _run(tok, [f"{fence}\nprint(6*7)\n```", FINAL])
    assert s.metadata["tool_statuses"] == ["ok"] and "Code execution result: 42\n" in s.response_text


def test_last_turn_ends_at_its_first_closed_block(tok):
    # the model writes its own result block and an answer after it: not run, not rewarded
    forged = "```python\nprint(6*7)\n```\nCode execution result: 42\n\\boxed{42}<|im_end|>"
    s, _ = _run(tok, [forged], cfg(max_turns=1))
    assert s.response_text == "```python\nprint(6*7)\n```" and s.metadata["tool_statuses"] == []
    assert s.reward == 0.0 and s.loss_mask == [1] * len(s.response_ids)


def test_turn_limit(tok):
    s, engine = _run(tok, [TOOL_TURN], cfg(max_turns=3))  # the model would call the tool forever
    assert s.num_turns == 3 and [m for m, _ in _segments(s.loss_mask)] == [1, 0, 1, 0, 1]
    assert s.metadata["tool_statuses"] == ["ok", "ok"]
    assert s.response_text.endswith(TOOL_TURN)  # the last turn's block was not run
    assert s.reward == 0.0


def test_final_answer_function_and_void_turns_end_the_sample(tok):
    s, _ = _run(tok, ["```py\nfinal_answer(6*7)\n```", "never reached"])
    assert s.num_turns == 1 and s.metadata["tool_statuses"] == ["ok"] and s.reward == 1.0
    assert s.response_text.endswith("Code execution result: \\boxed{42}\n")
    s, engine = _run(tok, ["I think it is 41.<|im_end|>", "never reached"])
    assert s.num_turns == 1 and len(engine.requests) == 2 and s.reward == 0.0  # 2 samples, 1 request each


def test_observation_truncated_to_token_budget(tok):
    s, _ = _run(tok, ["```python\nprint('ab' * 5000)\n```", FINAL], cfg(observation_max_tokens=60))
    segs = _segments(s.loss_mask)
    assert segs[1][0] == 0 and segs[1][1] == 60
    start = segs[0][1]
    obs_text = tok.decode(s.response_ids[start:start + 60])
    assert obs_text.startswith("\nCode execution result: abab") and "...[truncated]" in obs_text
    assert obs_text.endswith("\n")


def test_tool_errors_and_timeouts_become_observations(tok):
    c = cfg()
    # The limit must also let `1/0` finish: an interpreter start in bwrap under a loaded machine
    # (make test's two workers) took over 1 s once, and the error read as a timeout.
    c.sandbox.timeout_s = 4
    s, _ = _run(tok, ["```python\nwhile True: pass\n```", "```python\n1/0\n```", FINAL], c)
    assert s.metadata["tool_statuses"] == ["timeout", "error"]
    assert "TimeoutError: execution exceeded 4 s" in s.response_text
    assert "ZeroDivisionError" in s.response_text


def test_response_budget_ends_the_sample(tok):
    c = cfg(max_response_len=80, max_turns=10)
    c.max_new_tokens = 60
    s, _ = _run(tok, [TOOL_TURN], c)
    assert len(s.response_ids) <= 80 and s.finish_reason == "length"


def test_per_turn_budget_spans_continuations(tok):
    c = cfg()
    c.max_new_tokens = 20  # the opening fence ends at 19 chars, the closing one comes later
    s, engine = _run(tok, [TOOL_TURN, FINAL], c)
    assert s.finish_reason == "length" and len(s.response_ids) == 20 and s.metadata["tool_statuses"] == []
    assert sorted(p["max_new_tokens"] for _, p in engine.requests) == [1, 1, 20, 20]  # 2 samples


def test_single_turn_groups_seeds_and_top_p_warning(tok, caplog):
    engine = ScriptedEngine(tok, [FINAL])
    c = RolloutConfig(n_samples=3, max_new_tokens=50, top_p=0.9, reward="math", stop_token_ids=[2], reward_workers=0)
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


def test_tool_metrics_from_samples(tok):
    from rollout.tool_metrics import tool_metrics

    c = cfg()
    # A limit that `1/0` meets even on a loaded machine (see the test above); reward in a worker
    # process so that reward_status is set.
    c.sandbox.timeout_s, c.reward_workers = 4, 1
    s1, _ = _run(tok, ["```python\nwhile True: pass\n```", "```python\n1/0\n```", TOOL_TURN, FINAL], c)
    s2, _ = _run(tok, ["I think it is 41.<|im_end|>"])
    m = tool_metrics([s1, s2])
    obs1 = len(s1.loss_mask) - sum(s1.loss_mask)
    assert obs1 > 0 and m["rollout/obs_tokens_mean"] == obs1 / 2
    assert m["rollout/turns_mean"] == (4 + 1) / 2 and m["rollout/tool_calls_mean"] == 3 / 2
    assert m["rollout/tool_use_frac"] == 0.5 and m["rollout/final_answer_frac"] == 0.5
    assert (m["rollout/tool_status_ok"], m["rollout/tool_status_error"], m["rollout/tool_status_timeout"],
            m["rollout/tool_status_memory"]) == (1, 1, 1, 0)
    assert m["rollout/reward_timeouts"] == 0 and s1.metadata["reward_status"] == "ok"
    assert "rollout/turns_mean" not in tool_metrics([s2], multi_turn=False)
