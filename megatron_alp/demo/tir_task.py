"""A scripted tool-use task for CPU tests of multi-turn TIR: multiply two numbers with Python.

A tiny model cannot multiply, but it can copy: the solution is to write the product as code, run
it, and copy the tool's output into the answer::

    user:      37*58
    assistant: ```py\\nprint(37*58)\\n```                   (model turn 1: a closed fence runs it)
    tool:      \\nCode execution result: 2146\\n             (observation, loss-masked)
    assistant: \\boxed{2146}<|im_end|>                     (model turn 2)

The reward needs the tool: the math reward of the boxed answer against the product. The data is
written in verl's layout (chat-message ``prompt``, the answer at ``reward_model.ground_truth``),
and a short supervised warm start on whole trajectories (loss on the model turns only) teaches
the tiny model the protocol, so RL starts with tool calls and reward variance.

    python -m megatron_alp.demo.tir_task --out DIR     # DIR/hf_warm, DIR/mcore, DIR/train.parquet
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from typing import Dict, List, Tuple

from .assets import run_cmd

logger = logging.getLogger(__name__)


def problems(n: int, seed: int = 0, digits: int = 2) -> List[Tuple[str, str]]:
    """``n`` (question "a*b", answer "a*b's value") pairs of ``digits``-digit factors."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    out = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append((f"{a}*{b}", str(a * b)))
    return out


def verl_records(pairs: List[Tuple[str, str]]) -> List[Dict]:
    """verl's parquet layout (what the ALP reference's datasets hold)."""
    return [{"prompt": [{"role": "user", "content": q}], "data_source": "tir_mul", "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"index": i}}
            for i, (q, a) in enumerate(pairs)]


def trajectory(tok, question: str, answer: str) -> Tuple[List[int], List[int]]:
    """(ids, loss mask) of the ideal two-turn response after the chat-templated prompt."""
    from rollout.tir import OBS_MARKER

    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompt = enc(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True))
    turn1, obs, turn2 = enc(f"```py\nprint({question})\n```"), enc(f"\n{OBS_MARKER}{answer}\n"), \
        enc(f"\\boxed{{{answer}}}<|im_end|>")
    ids = prompt + turn1 + obs + turn2
    mask = [0] * len(prompt) + [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
    return ids, mask


def prepare_tir_assets(out: str, warm_steps: int = 150, num_prompts: int = 256, seed: int = 0) -> Dict[str, str]:
    """Tiny model (full ASCII tokenizer) warm-started on the task, its Megatron copy, verl data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from rollout.tiny_model import make_tiny_model

    from .warmstart import fit_sequences

    os.makedirs(out, exist_ok=True)
    init_dir, hf_dir = os.path.join(out, "hf_init"), os.path.join(out, "hf_warm")
    make_tiny_model(init_dir, alphabet="full", hidden_size=64, num_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, seed=seed)
    tok = AutoTokenizer.from_pretrained(init_dir)
    examples = [trajectory(tok, q, a) for q, a in problems(1024, seed=seed + 1)]
    loss = fit_sequences(init_dir, hf_dir, examples, steps=warm_steps, batch_size=32, lr=3e-3, seed=seed)
    logger.info("TIR warm start: final loss %.3f", loss)
    data = os.path.join(out, "train.parquet")
    pq.write_table(pa.Table.from_pylist(verl_records(problems(num_prompts, seed=seed + 2))), data)
    mcore = os.path.join(out, "mcore")
    run_cmd([sys.executable, "tools/convert.py", "hf-to-mcore", "--hf", hf_dir, "--out", mcore, "--tp", "1",
             "--no-progress"])
    return {"hf": hf_dir, "mcore": mcore, "data": data}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--warm-steps", type=int, default=150)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for k, v in prepare_tir_assets(os.path.abspath(args.out), args.warm_steps).items():
        logger.info("%s: %s", k, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
