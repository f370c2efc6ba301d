"""Evaluate a model on math benchmarks the way the papers report them (docs/eval.md).

    python tools/eval.py --model PATH --data FILE [--data NAME=FILE ...] --n 16 --out DIR \
        [--config configs/eval/alp_single_turn.yaml] [--engine-url URL ...] [section.key=value ...]

PATH is an HF checkpoint directory, a bus version directory (verified against its manifest
first), or a Megatron checkpoint from tools/convert.py (exported to HF with the bus's export,
``tools/convert.py mcore-to-hf``, into DIR/hf). The model is served by the configured engines
(``rollout.engine``: SGLang on GPU nodes, the local engine on a CPU), or ``--engine-url`` uses
engines already serving it. Writes DIR/results.md, DIR/results.csv and DIR/samples.jsonl and
prints the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("tools.eval")


class EvalError(Exception):
    """A problem with the user's input: reported as one line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF dir, bus version dir, or Megatron checkpoint")
    p.add_argument("--data", action="append", default=[], help="benchmark file, FILE or NAME=FILE (repeatable)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (eval.n)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="YAML with rollout: and eval: sections (configs/eval/)")
    p.add_argument("--engine-url", action="append", default=[], help="use running engines (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (rollout.*, eval.*)")
    return p.parse_args(argv)


def load_job(args):
    from megatron_alp.config.loader import ConfigError, apply_overrides, from_dict, load_yaml_tree, validate_tree
    from rollout.eval.config import EvalJobConfig

    tree = load_yaml_tree(args.config) if args.config else {}
    try:
        tree = apply_overrides(tree, args.overrides)
        job = from_dict(EvalJobConfig, tree)
        if args.data:
            job.eval.datasets = list(args.data)
        if args.n is not None:
            job.eval.n = args.n
        if args.engine_url:
            job.rollout.urls = list(args.engine_url)
        validate_tree(job)
    except (ConfigError, ValueError) as e:
        raise EvalError(str(e)) from None
    if not job.eval.datasets:
        raise EvalError("no benchmark: give --data FILE (or eval.datasets in --config)")
    return job


def resolve_model(path: str, out: str) -> str:
    """An HF directory the engines can serve, from any of the three kinds of PATH."""
    from megatron_alp.convert.mcore_ckpt import is_megatron_checkpoint
    from rollout.bus.manifest import has_manifest

    if not os.path.isdir(path):
        raise EvalError(f"--model {path}: no such directory")
    if has_manifest(path):
        from rollout.bus.disk import verify

        try:
            verify(path)
        except Exception as e:  # BusError and I/O errors: the version must not be served unchecked
            raise EvalError(f"--model {path}: bus version failed verification: {e}") from None
        logger.info("bus version %s verified against its manifest", path)
        return path
    if is_megatron_checkpoint(path):
        hf = os.path.join(out, "hf")
        logger.info("Megatron checkpoint: exporting to %s with tools/convert.py mcore-to-hf", hf)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py"), "mcore-to-hf",
               "--mcore", path, "--out", hf, "--force", "--no-progress"]
        if subprocess.run(cmd).returncode != 0:
            raise EvalError(f"--model {path}: export to HF failed (command: {' '.join(cmd)})")
        return hf
    if os.path.isfile(os.path.join(path, "meta.json")) and any(f.startswith("rank_") for f in os.listdir(path)):
        raise EvalError(f"--model {path} is a trainer checkpoint (per-rank optimizer state): evaluate the bus "
                        "version it published (bus.dir/v<step>) instead")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise EvalError(f"--model {path}: not an HF checkpoint (no config.json), a bus version (no manifest) "
                    "or a Megatron checkpoint")


def run(args) -> int:
    from transformers import AutoTokenizer

    from rollout.aio import run_sync
    from rollout.engines.start import make_fleet, start_engines
    from rollout.eval.benchmarks import load_benchmark
    from rollout.eval.runner import eval_rollout_config, evaluate, markdown_table, write_report

    job = load_job(args)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model = resolve_model(args.model, out) if not job.rollout.urls else args.model
    for spec in job.eval.datasets:  # fail on a missing file before any engine starts
        path = spec.partition("=")[2] or spec
        if not os.path.isfile(path):
            raise EvalError(f"--data {spec}: no such file")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model)
    cfg = eval_rollout_config(job.rollout, job.eval)
    for spec in job.eval.datasets:  # and on a file without its benchmark's fields
        load_benchmark(spec, tokenizer, cfg.data, prompt_key=job.eval.prompt_key, label_key=job.eval.label_key)
    engines = start_engines(job.rollout, model_path=model, log_dir=os.path.join(out, "engines"))
    try:
        fleet = make_fleet(job.rollout, engines)
        runs = run_sync(evaluate(fleet, tokenizer, job.rollout, job.eval))
        run_sync(fleet.close())
    finally:
        engines.stop()
    paths = write_report(runs, out, title=f"Evaluation of {args.model}", threshold=job.eval.correct_threshold)
    print(markdown_table([r.result for r in runs]))
    print(f"wrote {', '.join(paths.values())}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except (EvalError, FileNotFoundError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad benchmark files, n < k and the like, named by the library
        print(f"eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
