"""Named instructions that ``rollout.data.instruction`` can refer to.

``SIMPLETIR`` is the tool-use instruction of the ALP paper's multi-turn runs, word for word:
``data.prompt`` of amazon-science/adaptive-layerwise-perturbation,
``multi-turn/recipe/simpletir/config/simpletir_trainer.yaml`` (commit 96a9655; the ALP recipe is
SimpleTIR's, ltzheng/SimpleTIR). The reference prepends it to the dataset's user message; so does
:func:`rollout.data.render_prompt`. It teaches the protocol :mod:`rollout.tir` runs: a closed
code fence triggers execution and the output follows ``Code execution result: ``.
"""

from __future__ import annotations

from typing import Dict, Optional

SIMPLETIR = (
    "Solve the following problem step by step. You now have the ability to selectively write executable "
    "Python code to enhance your reasoning process. The Python code will be executed by an external sandbox, "
    "and the output (after \"Code execution result: \") is returned to aid your reasoning and help you arrive "
    "at the final answer. The Python code should be complete scripts, including necessary imports.\n"
    "\n"
    "Code Format:\n"
    "Each code snippet is wrapped between ```. You need to use `print()` to output intermediate results.\n"
    "\n"
    "Answer Format:\n"
    "You must use \\boxed to return your answer. The last part of your response should be:\n"
    "\\boxed{'The final answer goes here.'}\n"
    "\n"
    "User Question:\n"
)

NAMED: Dict[str, str] = {"simpletir": SIMPLETIR}


def resolve_instruction(value: Optional[str]) -> str:
    """The instruction text of ``rollout.data.instruction``: a name from :data:`NAMED`, or literal text."""
    if not value:
        return ""
    return NAMED.get(value, value)
