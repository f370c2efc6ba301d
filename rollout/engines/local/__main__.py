"""CLI: ``python -m rollout.engines.local --model PATH --port N [options]``."""

from __future__ import annotations

import argparse
import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rollout.engines.local",
                                description="CPU development engine speaking SGLang's HTTP protocol subset.")
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "fp8"], default="fp32",
                   help="weights/compute dtype; fp8 = emulated blockwise e4m3 on bf16")
    p.add_argument("--api-key", default=os.environ.get("ROLLOUT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (all endpoints but /health*)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="when idle, wait this long to collect concurrent requests")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--weight-version", default="default", help="initial weight_version")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-n", type=int, default=64, help="largest sampling_params.n accepted (400 above)")
    p.add_argument("--max-request-tokens", type=int, default=1 << 20,
                   help="largest prompt + max_new_tokens summed over one request's sequences (400 above)")
    p.add_argument("--prefix-cache-tokens", type=int, default=1 << 16,
                   help="tokens of prompt KV kept for prefix reuse (0 = off, like --disable-radix-cache)")
    p.add_argument("--reference-paths", action="store_true",
                   help="sample row by row, prefill every repeat, quantize every FP8 input alone: the plain "
                        "paths the batched ones are checked against (bench.rollout_demo's baseline)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if not os.path.isdir(args.model):
        raise SystemExit(f"python -m rollout.engines.local: --model {args.model!r} is not a directory")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger(__name__).warning("binding %s without --api-key exposes weight updates", args.host)

    import torch
    from aiohttp import web

    from .app import build_app
    from .runner import LocalModel
    from .scheduler import Scheduler
    from .server import Limits, LocalEngine

    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    model = LocalModel(args.model, precision=args.precision, seed=args.random_seed,
                       prefix_cache_tokens=args.prefix_cache_tokens, reference=args.reference_paths)
    scheduler = Scheduler(model, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000)
    info = {"served_model_name": args.served_model_name or args.model, "host": args.host, "port": args.port,
            "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
            "random_seed": args.random_seed}
    engine = LocalEngine(model, scheduler, weight_version=args.weight_version, api_key=args.api_key, info=info,
                         limits=Limits(max_n=args.max_n, max_request_tokens=args.max_request_tokens))
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its requests
    web.run_app(build_app(engine), host=args.host, port=args.port, print=None, access_log=None,
                shutdown_timeout=2.0, handler_cancellation=True)


if __name__ == "__main__":
    main()
