"""The tiny model, task data and converted checkpoint that the demo, the end-to-end tests, the
SLURM tiny job and the CPU mini-reproduction train on.

    python -m megatron_alp.demo.assets --out DIR [--tp 2] [--warm-steps 55]

writes ``DIR/hf_init`` (random tiny Qwen2, digits tokenizer), ``DIR/hf_warm`` (briefly warm-started
on the copy task), ``DIR/copy_train.jsonl``, ``DIR/copy_heldout.jsonl`` (evaluation problems not in the
training file) and ``DIR/mcore`` (tools/convert.py hf-to-mcore).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from typing import Callable, Dict

from ..config.loader import CONFIG_ROOT

REPO = os.path.dirname(str(CONFIG_ROOT))
logger = logging.getLogger(__name__)


def run_cmd(cmd, env=None) -> None:
    """Run a command from the repository root; a failure ends the caller with the command shown."""
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}): {' '.join(cmd)}")


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def prepare_tiny_assets(out: str, warm_steps: int = 55, tp: int = 2, num_prompts: int = 1024,
                        log: Callable[[str], None] = logger.info, hidden_size: int = 64,
                        intermediate_size: int = 128, digits: int = 3) -> Dict[str, str]:
    from rollout.rewards.synthetic import synthetic_records
    from rollout.tiny_model import make_tiny_model

    from .warmstart import warm_start

    os.makedirs(out, exist_ok=True)
    init_dir, hf_dir = os.path.join(out, "hf_init"), os.path.join(out, "hf_warm")
    log("[1/5] tiny Qwen2-shaped model (digits tokenizer)")
    make_tiny_model(init_dir, alphabet="digits", hidden_size=hidden_size, num_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=intermediate_size, seed=0)
    log(f"[2/5] supervised warm start on the copy task ({warm_steps} steps)")
    warm_start(init_dir, hf_dir, synthetic_records(2048, "copy", digits, seed=123), steps=warm_steps)
    data = os.path.join(out, "copy_train.jsonl")
    with open(data, "w") as f:
        for r in synthetic_records(num_prompts, "copy", digits, seed=0):
            f.write(json.dumps(r) + "\n")
    heldout = os.path.join(out, "copy_heldout.jsonl")  # evaluation problems never trained on
    seen = {r["prompt"] for r in synthetic_records(num_prompts, "copy", 3, seed=0)}
    with open(heldout, "w") as f:
        for r in synthetic_records(4 * num_prompts, "copy", 3, seed=99):
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                f.write(json.dumps(r) + "\n")
    log("[3/5] convert HF -> Megatron (tools/convert.py)")
    mcore_dir = os.path.join(out, "mcore")
    # The tool spawns its own TP world; a caller's torch.distributed variables (an in-process
    # single-rank group sets WORLD_SIZE=1) would make it join a world of 1 instead.
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    run_cmd([sys.executable, "tools/convert.py", "hf-to-mcore", "--hf", hf_dir, "--out", mcore_dir,
             "--tp", str(tp), "--no-progress"], env=env)
    return {"hf": hf_dir, "mcore": mcore_dir, "data": data, "heldout": heldout}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1, help="TP of the conversion world (any works for loading)")
    p.add_argument("--warm-steps", type=int, default=55)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    paths = prepare_tiny_assets(os.path.abspath(args.out), args.warm_steps, args.tp)
    for k, v in paths.items():
        logger.info("%s: %s", k, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
