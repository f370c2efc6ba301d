"""SGLang server and router command lines, built from the `rollout` config.

Targets SGLang 0.5.23 (`python -m sglang.launch_server`; flags from its ServerArgs) and
`python -m sglang_router.launch_router --worker-urls ...`. Precision mapping:

| rollout.precision | flags |
| --- | --- |
| fp32 / bf16 / fp16 | `--dtype float32 / bfloat16 / float16` |
| fp8 | `--dtype bfloat16 --quantization fp8` (online blockwise FP8 of a BF16 checkpoint) |

`rollout.kv_cache_dtype = fp8_e4m3` adds `--kv-cache-dtype fp8_e4m3`. Engine ``i`` of a node gets
GPUs ``[i * tp * dp, (i + 1) * tp * dp)`` through `--base-gpu-id`.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from ..config import RolloutConfig

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


def sglang_server_command(cfg: RolloutConfig, model_path: str, port: int, *, index: int = 0,
                          host: Optional[str] = None) -> List[str]:
    """The exact `sglang.launch_server` command line of engine ``index``."""
    sg = cfg.sglang
    cmd = [sg.python or sys.executable, "-m", "sglang.launch_server",
           "--model-path", model_path,
           "--host", host or cfg.host,
           "--port", str(port),
           "--tp-size", str(sg.tp_size),
           "--dp-size", str(sg.dp_size),
           "--base-gpu-id", str(index * sg.tp_size * sg.dp_size),
           "--dtype", DTYPES[cfg.precision],
           "--random-seed", str(cfg.seed + index),
           "--weight-version", str(cfg.weight_version)]
    if cfg.precision == "fp8":
        cmd += ["--quantization", "fp8"]
    if cfg.kv_cache_dtype != "auto":
        cmd += ["--kv-cache-dtype", cfg.kv_cache_dtype]
    if sg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(sg.mem_fraction_static)]
    if sg.deterministic:
        cmd += ["--enable-deterministic-inference"]
    if sg.load_format:
        cmd += ["--load-format", sg.load_format]
    if sg.enable_memory_saver:
        cmd += ["--enable-memory-saver"]
    if sg.skip_tokenizer_init:
        cmd += ["--skip-tokenizer-init"]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    cmd += list(sg.extra_args)
    return cmd


def router_command(cfg: RolloutConfig, worker_urls: Sequence[str], *, port: Optional[int] = None,
                   host: Optional[str] = None) -> List[str]:
    """`sglang_router.launch_router` in front of ``worker_urls``."""
    cmd = [cfg.sglang.python or sys.executable, "-m", "sglang_router.launch_router",
           "--host", host or cfg.host, "--port", str(port or cfg.sglang.router_port),
           # cache-aware: a request goes to the worker whose cache holds its longest prefix (load
           # permitting), so the turns of a multi-turn sample stay together. It is the router's
           # default; named so that a changed default cannot silently undo it.
           "--policy", "cache_aware",
           "--worker-urls", *worker_urls]
    return cmd
