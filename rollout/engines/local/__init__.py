"""The local CPU engine: a development engine speaking SGLang's HTTP protocol subset.

It loads an HF checkpoint with transformers and serves /generate (continuous batching of
concurrent requests, SGLang log-prob semantics), weight updates from disk, pause/continue, abort,
health and info endpoints, in fp32, bf16 or emulated FP8. It is what the CPU demo and the
integration tests run against. It is **not** a substitute for SGLang on GPUs: no paged KV cache,
no CUDA graphs, no tensor parallelism. Its requests pass SGLang 0.5.23's gates (``gate``) and its
prefix cache flushes as SGLang's radix cache does (``prefix_cache``).

Start one with ``python -m rollout.engines.local --model PATH --port N`` (see ``--help``).
"""

from .runner import LocalModel, Request  # noqa: F401
from .scheduler import Scheduler  # noqa: F401
