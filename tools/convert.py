"""HF <-> Megatron checkpoint conversion (docs/convert.md).

    python tools/convert.py hf-to-mcore --hf HF_DIR --out MCORE_DIR [--tp N --pp M] [--dtype bf16] [--verify]
    python tools/convert.py mcore-to-hf --mcore MCORE_DIR --out HF_DIR [--tp N --pp M] [--verify]

Without torchrun the command spawns a gloo world of TP x PP processes on this machine; under
torchrun (``torchrun --nproc-per-node 8 tools/convert.py ...``) it uses that world (extra ranks
are data-parallel replicas). ``--verify`` compares logits and log-probs of transformers and the
Megatron model (fp32, a few prompts), prints the max abs differences and exits 1 beyond ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

QUIET = (  # third-party noise on every CPU run (message prefixes), unrelated to what the user asked for
    "Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated",
    "When using async grad allreduce", "Please use DTensor instead", "`load_state_dict` is deprecated",
)


def quiet_warnings() -> None:
    """Silence :data:`QUIET` here and, through PYTHONWARNINGS, in the processes this one spawns."""
    import re
    import warnings

    for message in QUIET:
        warnings.filterwarnings("ignore", message=re.escape(message))
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}" for m in QUIET))


quiet_warnings()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The keys of megatron_alp.convert.world.DTYPE_ARGS (a test checks): named here so that this module
# and a bad input's error need neither torch nor Megatron (3 s of CPU to print one line).
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``1.5GB``, ``1048576`` -> bytes; ValueError naming the option otherwise."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    clean = text.strip().upper()
    mult = 1
    for unit, m in units.items():
        if clean.endswith(unit):
            clean, mult = clean[: -len(unit)].strip(), m
            break
    try:
        value = float(clean)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or a byte count") from None
    if not value * mult >= 1 or value * mult == float("inf"):
        raise ValueError(f"--max-shard-size {text!r}: must be a positive size")
    return int(value * mult)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("hf-to-mcore", "HF directory -> Megatron-Core distributed checkpoint"),
                           ("mcore-to-hf", "Megatron checkpoint (from hf-to-mcore or a run) -> HF directory")):
        s = sub.add_parser(name, help=helptext)
        if name == "hf-to-mcore":
            s.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
        else:
            s.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
            s.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
        s.add_argument("--out", required=True, help="output directory (must not hold a checkpoint already)")
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion world")
        s.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the conversion world")
        s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="dtype written (auto = the source's)")
        s.add_argument("--verify", action="store_true", help="compare logits/log-probs with transformers")
        s.add_argument("--tol", type=float, default=1e-2, help="verify tolerance on max abs logits/log-probs")
        s.add_argument("--force", action="store_true", help="write into a non-empty --out")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.add_argument("--timeout", type=float, default=24 * 3600, help="seconds before a spawned world is killed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    src = args.hf if args.command == "hf-to-mcore" else args.mcore
    if not os.path.isdir(src):
        print(f"error: {src} is not a directory", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        print(f"error: {args.out} is not empty (use --force to write into it)", file=sys.stderr)
        return 2
    try:  # fail fast, before a world is started: config and layout first, from headers alone, without torch
        max_shard_bytes = _size(args.max_shard_size) if args.command == "mcore-to-hf" else None
        from megatron_alp.config import ParallelConfig
        from megatron_alp.runtime.layout import validate_layout

        if args.command == "hf-to-mcore":
            from megatron_alp.convert.hf_config import model_config_from_hf, read_hf_config

            model_cfg = model_config_from_hf(read_hf_config(src), src)
        else:
            from megatron_alp.convert.meta import model_config_from_meta, read_meta

            model_cfg = model_config_from_meta(read_meta(src))
        world = int(os.environ.get("WORLD_SIZE", args.tp * args.pp))
        ParallelConfig(tp=args.tp, pp=args.pp).validate()  # --tp 0: a line, not a ZeroDivisionError
        validate_layout(ParallelConfig(tp=args.tp, pp=args.pp), world, model_cfg)
        if args.command == "hf-to-mcore":  # tensor names and shapes (safetensors headers; imports Megatron)
            from megatron_alp.convert.pipeline import preflight

            preflight(src)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = dict(command=args.command, out=os.path.abspath(args.out), tp=args.tp, pp=args.pp, dtype=args.dtype,
                verify=args.verify, tol=args.tol, progress=not args.no_progress)
    opts["hf" if args.command == "hf-to-mcore" else "mcore"] = os.path.abspath(src)
    if args.command == "mcore-to-hf":
        opts["max_shard_bytes"] = max_shard_bytes
    from megatron_alp.convert.world import run_command

    t0 = time.perf_counter()
    if "WORLD_SIZE" in os.environ:  # torchrun: this process is one rank of the world
        import torch.distributed as dist

        reports = [run_command(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), opts)]
        if dist.is_initialized():
            dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0 if not args.verify or reports[0]["verify"]["ok"] else 1
    else:
        from megatron_alp.runtime.spawn import run_world

        reports = run_world(run_command, args.tp * args.pp, args=(opts,), timeout=args.timeout)
    report = reports[0]
    print(f"{args.command}: {src} -> {args.out} ({report['model_type']}, {report['dtype']}, "
          f"TP={args.tp} PP={args.pp}) in {time.perf_counter() - t0:.1f} s")
    if args.verify:
        v = report["verify"]
        print(f"verify: max |d logits| = {v['max_abs_logits']:.3e}, max |d log-probs| = "
              f"{v['max_abs_logprobs']:.3e}, max |d token log-probs| = {v['max_abs_token_logprobs']:.3e} "
              f"over {v['prompts']} prompts / {v['tokens']} tokens (tol {v['tol']:g}): "
              f"{'OK' if v['ok'] else 'FAILED'}")
        print(json.dumps(v))
        return 0 if v["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
