"""Synthetic verifiable tasks a tiny model can learn on a CPU in minutes of RL.

Prompts are short digit strings with a one-letter task tag, answers are digit strings:

| task | prompt | answer |
| --- | --- | --- |
| ``copy`` | ``c:381=`` | ``381`` |
| ``reverse`` | ``r:381=`` | ``183`` |
| ``add`` | ``a:38+17=`` | ``55`` |

Every character is one token of the ``digits`` char tokenizer (rollout/tiny_model.py: 24 tokens),
so a random model already hits a right digit now and then. The reward is **dense**: the fraction
of answer positions that are right, divided by the longer of answer and response, so a response
earns partial credit per correct digit and loses credit for extra characters (it has to learn to
stop with EOS). Exact answers score 1.0. A GRPO group of 8 samples therefore almost always has
reward variance, the signal RL needs from step one; ``copy`` with 3 digits is the demo's task
(``reverse`` and ``add`` are harder follow-ups).
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

TASKS = ("copy", "reverse", "add")


def make_problem(task: str, num_digits: int, rng: random.Random) -> Tuple[str, str]:
    """One (prompt, answer) pair of ``task`` with ``num_digits``-digit operands."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")
    digits = "".join(rng.choice("0123456789") for _ in range(num_digits))
    if task == "copy":
        return f"c:{digits}=", digits
    if task == "reverse":
        return f"r:{digits}=", digits[::-1]
    a = rng.randrange(10 ** num_digits)
    b = rng.randrange(10 ** num_digits)
    return f"a:{a}+{b}=", str(a + b)


def synthetic_records(n: int, task: str = "copy", num_digits: int = 3, seed: int = 0) -> List[Dict[str, Any]]:
    """``n`` dataset records ``{"prompt", "answer", "task"}`` (the JSONL layout rollout.data reads)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = make_problem(task, num_digits, rng)
        out.append({"prompt": prompt, "answer": answer, "task": task})
    return out


def char_match_score(response: str, answer: str) -> float:
    """Positionwise matches / max(len(answer), len(response)); 1.0 only for an exact answer."""
    if not answer and not response:
        return 1.0
    # positionwise over the shorter string (the longer one's tail counts in the denominator): truncation intended
    hits = sum(1 for a, b in zip(response, answer, strict=False) if a == b)
    return hits / max(len(answer), len(response))


def synthetic_reward(prompt: str, response: str, label: Any, metadata: Optional[Dict[str, Any]] = None) -> float:
    """Reward of a synthetic-task response (see the module docstring)."""
    return char_match_score(response, str(label))
