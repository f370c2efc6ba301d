"""Math answers: the last ``\\boxed{...}`` of the response vs the ground truth, with math-verify.

math-verify (HuggingFace) parses both sides to SymPy and compares them symbolically and
numerically, so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` agree; sets, intervals and matrices are
supported. A response without a boxed answer scores 0. math-verify's timeouts use SIGALRM, which
only works on the main thread: elsewhere they are disabled.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

_BOX_MARKERS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind(m) for m in _BOX_MARKERS)
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5" form: up to the next space or dollar
        rest = text[start:].split(None, 1)
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None  # unbalanced: the model was cut off


def _latex(s: str) -> str:
    s = s.strip()
    if s.startswith("$") or "\\boxed" in s:
        return s
    return f"${s}$"


def verify_answer(prediction: str, ground_truth: Any) -> bool:
    """True when math-verify judges ``prediction`` (LaTeX or plain) equal to ``ground_truth``."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold = parse(_latex(str(ground_truth)), extraction_config=configs, parsing_timeout=timeout)
        pred = parse(_latex(prediction), extraction_config=configs, parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception as e:  # a parser crash on model output is a wrong answer, not a failure
        logger.debug("math-verify failed on %r vs %r: %s", prediction, ground_truth, e)
        return False


def math_reward(prompt: str, response: str, label: Any, metadata: Optional[Dict[str, Any]] = None) -> float:
    """1.0 if the last boxed answer of ``response`` equals ``label``, else 0.0."""
    boxed = extract_boxed(response)
    if boxed is None or label is None:
        return 0.0
    return 1.0 if verify_answer(boxed, label) else 0.0
