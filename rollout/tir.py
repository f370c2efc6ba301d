"""Multi-turn tool-integrated reasoning (TIR): the model writes Python, the sandbox runs it.

The protocol is the ALP paper's (its multi-turn code is SimpleTIR's recipe:
amazon-science/adaptive-layerwise-perturbation, multi-turn/recipe/simpletir/agent_utils.py, and
the instruction in multi-turn/recipe/simpletir/config/simpletir_trainer.yaml, shipped here as
:data:`rollout.prompts.SIMPLETIR_TIR_PROMPT`); the loop is written anew:

1. A model turn runs until its **first closed code block** (```` ```python ````, ```` ```py ````,
   ```` ```python3 ```` or a bare ```` ``` ```` fence, then a newline, the code, a newline and the
   closing fence), EOS, a length stop, or the per-turn budget. It is generated with the stop string
   ```` ``` ````: a stop on an *opening* fence continues the same turn with a new request (the
   tokens are kept as generated: no re-tokenization), a stop on the closing fence ends the turn.
   The reference instead generates the whole turn and cuts the text after the first closed block.
2. The turn's tokens join the response with loss mask 1 and their log-probs.
3. The sample ends when the turn wrote ``\\boxed{`` (an answer), wrote no closed code block (a
   "void turn": the reference's ``mask_void_turns`` ends those samples too), did not stop on the
   fence, or was the last of ``max_turns`` (its code block is not run, so the last turn cannot
   write a made-up result and be rewarded for it: the response ends at that block, as in the
   reference).
4. Otherwise the block runs in the sandbox (with ``final_answer()`` defined first when
   ``multi_turn.final_answer_func``, as the reference's ``append_final_answer_func``); the
   observation ``"\\nCode execution result: <output>\\n"`` is cut to ``observation_max_tokens``
   (reference ``max_obs_length`` 256) and appended with loss mask 0 and no log-prob. Output that
   contains ``\\boxed{`` (``final_answer``) ends the sample, as in the reference.

Budgets (reference ``train_perturb.sh``): each turn up to ``rollout.max_new_tokens`` new tokens
(8000), the whole response up to ``multi_turn.max_response_len`` (16000).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from .config import RolloutConfig
from .sample import Sample
from .sandbox import Sandbox, ToolResult

FENCE = "```"
# The reference's pattern is r"```(?:py|python)?\n(.*?)\n```"; we also accept python3 / Python and
# trailing blanks after the language tag.
CODE_RE = re.compile(r"```(?:python3?|py|Python)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL)
OBS_MARKER = "Code execution result: "
TRUNC_MARKER = "\n...[truncated]"
ANSWER_MARK = "\\boxed{"
FINAL_ANSWER_PRELUDE = 'def final_answer(result):\n    print(f"\\\\boxed{{{result}}}")\n\n'
"""What the reference prepends to every code block (append_final_answer_func)."""


def first_code_block(text: str) -> Optional[str]:
    """The code of the first closed code block of ``text``, or None."""
    m = CODE_RE.search(text)
    return m.group(1) if m else None


def extract_code(text: str) -> Optional[str]:
    """Alias kept for callers of the previous protocol: the first closed block."""
    return first_code_block(text)


def observation_text(result: ToolResult, timeout_s: float) -> str:
    """What the model sees of one execution (before the token budget), after the marker."""
    if result.status == "timeout":
        body = (result.stdout + f"\nTimeoutError: execution exceeded {timeout_s:g} s").strip()
    elif result.status == "memory":
        body = (result.stdout + "\nMemoryError: memory limit exceeded").strip()
    elif result.status in ("error", "setup"):
        tail = "\n".join(result.stderr.strip().splitlines()[-6:])
        body = (result.stdout + "\n" + tail).strip()
    else:
        body = result.stdout.rstrip("\n")
    return body


def observation_ids(tokenizer, body: str, max_tokens: int) -> List[int]:
    """Token ids of ``"\\nCode execution result: {body}\\n"``, the body cut to fit ``max_tokens``."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head, tail, marker = enc("\n" + OBS_MARKER), enc("\n"), enc(TRUNC_MARKER)
    content = enc(body)
    room = max_tokens - len(head) - len(tail)
    if len(content) > room:
        content = content[: max(0, room - len(marker))] + marker
    return (head + content + tail)[:max_tokens]


async def model_turn(engine, tokenizer, prompt_ids: List[int], cfg: RolloutConfig,
                     params: Callable[[int, List[str]], Dict[str, Any]], sample: Sample) -> Tuple[str, Optional[str]]:
    """Generate one turn into ``sample``; returns (turn text, code of its closed block or None)."""
    stop = list(cfg.stop) + ([FENCE] if FENCE not in cfg.stop else [])
    turn_ids: List[int] = []
    while True:
        room = min(cfg.max_new_tokens - len(turn_ids), cfg.multi_turn.max_response_len - len(sample.response_ids))
        if room <= 0:
            sample.finish_reason = "length"
            return tokenizer.decode(turn_ids, skip_special_tokens=True), None
        out = await engine.generate(prompt_ids + sample.response_ids, params(room, stop))
        sample.append(out.output_ids, out.logprobs, trainable=True)
        sample.finish_reason, sample.weight_version = out.finish_reason, out.weight_version
        sample.weight_versions.append(out.weight_version)
        turn_ids += out.output_ids
        text = tokenizer.decode(turn_ids, skip_special_tokens=True)
        if out.finish_reason != "stop" or out.finish_detail.get("matched") != FENCE or not out.output_ids:
            return text, None
        code = first_code_block(text)
        if code is not None or ANSWER_MARK in text:
            return text, code
        # Stopped on an opening fence: the same turn goes on (SGLang matches stop strings only in
        # the newly generated text, so the fence in the prefix does not stop it again).


async def run_tool_loop(engine, tokenizer, prompt_ids: List[int], cfg: RolloutConfig, sandbox: Sandbox,
                        params: Callable[[int, List[str]], Dict[str, Any]], sample: Sample) -> None:
    """Fill ``sample`` (response ids, log-probs, masks, finish reason, tool statuses) turn by turn."""
    mt = cfg.multi_turn
    statuses: List[str] = []
    for turn in range(mt.max_turns):
        sample.num_turns = turn + 1
        text, code = await model_turn(engine, tokenizer, prompt_ids, cfg, params, sample)
        if code is None or ANSWER_MARK in text or turn == mt.max_turns - 1:
            break
        result = await sandbox.run((FINAL_ANSWER_PRELUDE if mt.final_answer_func else "") + code)
        statuses.append(result.status)
        room = mt.max_response_len - len(sample.response_ids)
        obs = observation_ids(tokenizer, observation_text(result, sandbox.cfg.timeout_s),
                              min(mt.observation_max_tokens, room))
        sample.append(obs, None, trainable=False)
        if len(sample.response_ids) >= mt.max_response_len:
            sample.finish_reason = "length"
            break
        if ANSWER_MARK in result.stdout:
            break  # final_answer() printed the answer (the reference ends the sample here)
    sample.metadata["tool_statuses"] = statuses
