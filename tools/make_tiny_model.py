"""Write a tiny random Qwen2ForCausalLM and its char-level tokenizer to a directory (no download).

    python tools/make_tiny_model.py OUT_DIR [--alphabet full|digits] [--hidden 64] [--layers 2] ...

The checkpoint loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``; the local engine serves it
(``python -m rollout.engines.local --model OUT_DIR``) and the trainer converts it like any Qwen2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rollout.tiny_model import ALPHABETS, make_tiny_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--alphabet", default="full", help=f"one of {sorted(ALPHABETS)} or the characters themselves")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128, help="intermediate (SwiGLU) size")
    p.add_argument("--max-position", type=int, default=512)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_tiny_model(args.out_dir, alphabet=args.alphabet, hidden_size=args.hidden, num_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                          intermediate_size=args.ffn, max_position_embeddings=args.max_position,
                          tie_word_embeddings=args.tie_embeddings, seed=args.seed, init_std=args.init_std)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    print(f"{out}: Qwen2ForCausalLM, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']}")


if __name__ == "__main__":
    main()
