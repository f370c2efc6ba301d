"""Multi-turn tool-integrated reasoning (TIR): the model writes Python, the sandbox runs it.

One sample, turn by turn (the ALP paper's TIR setup; the loop shape follows verl's / slime's
multi-turn rollouts, written anew):

1. Generate a turn with the multi-turn stop strings (default ```` ```output ````) added.
2. The turn's tokens join the response with loss mask 1 and their log-probs.
3. If the turn stopped on a tool stop string and contains a ```` ```python ```` block, the last
   block runs in the sandbox; its output (or error) becomes the observation
   ``"\\n<output>\\n```\\n"`` (closing the ```` ```output ```` block the model opened), cut to
   ``observation_max_tokens`` with a ``...[truncated]`` marker, appended with loss mask 0 and no
   log-prob.
4. Stop after EOS, a length stop, ``max_turns`` model turns (the last turn gets no tool stop
   strings) or when the response budget ``max_response_len`` is used up.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional

from .config import RolloutConfig
from .sample import Sample
from .sandbox import Sandbox, ToolResult

CODE_RE = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
TRUNC_MARKER = "\n...[truncated]"


def extract_code(text: str) -> Optional[str]:
    """The last closed ```` ```python ```` block of ``text``, or None."""
    blocks = CODE_RE.findall(text)
    return blocks[-1] if blocks else None


def observation_text(result: ToolResult, timeout_s: float) -> str:
    """What the model sees of one execution (before the token budget)."""
    if result.status == "timeout":
        body = (result.stdout + f"\nTimeoutError: execution exceeded {timeout_s:g} s").strip()
    elif result.status == "memory":
        body = (result.stdout + "\nMemoryError: memory limit exceeded").strip()
    elif result.status in ("error", "setup"):
        tail = "\n".join(result.stderr.strip().splitlines()[-6:])
        body = (result.stdout + "\n" + tail).strip()
    else:
        body = result.stdout.rstrip("\n")
    return body if body else "(no output)"


def observation_ids(tokenizer, body: str, max_tokens: int) -> List[int]:
    """Token ids of ``"\\n{body}\\n```\\n"``, the body cut so that the whole fits ``max_tokens``."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head, tail, marker = enc("\n"), enc("\n```\n"), enc(TRUNC_MARKER)
    content = enc(body)
    room = max_tokens - len(head) - len(tail)
    if len(content) > room:
        content = content[: max(0, room - len(marker))] + marker
    return (head + content + tail)[:max_tokens]


async def run_tool_loop(engine, tokenizer, prompt_ids: List[int], cfg: RolloutConfig, sandbox: Sandbox,
                        params: Callable[[int, List[str]], Dict[str, Any]], sample: Sample) -> None:
    """Fill ``sample`` (response ids, log-probs, masks, finish reason) turn by turn."""
    mt = cfg.multi_turn
    statuses: List[str] = []
    for turn in range(mt.max_turns):
        budget = mt.max_response_len - len(sample.response_ids)
        if budget <= 0:
            sample.finish_reason = "length"
            break
        last = turn == mt.max_turns - 1
        stop = list(cfg.stop) + ([] if last else [s for s in mt.stop if s not in cfg.stop])
        out = await engine.generate(prompt_ids + sample.response_ids, params(min(cfg.max_new_tokens, budget), stop))
        sample.append(out.output_ids, out.logprobs, trainable=True)
        sample.finish_reason = out.finish_reason
        sample.weight_version = out.weight_version
        sample.weight_versions.append(out.weight_version)
        sample.num_turns = turn + 1
        matched = out.finish_detail.get("matched")
        if last or out.finish_reason != "stop" or not isinstance(matched, str) or matched not in mt.stop:
            break
        code = extract_code(tokenizer.decode(out.output_ids, skip_special_tokens=True))
        if code is None:
            break  # announced an output block without code: nothing to run, the turn ends the sample
        result = await sandbox.run(code)
        statuses.append(result.status)
        room = mt.max_response_len - len(sample.response_ids)
        obs = observation_ids(tokenizer, observation_text(result, sandbox.cfg.timeout_s),
                              min(mt.observation_max_tokens, room))
        sample.append(obs, None, trainable=False)
        if len(sample.response_ids) >= mt.max_response_len:
            sample.finish_reason = "length"
            break
    sample.metadata["tool_statuses"] = statuses
