"""The `rollout` config section (the rollout package owns it; the trainer's tree embeds it).

Every field has a docstring; ``validate()`` raises ``ValueError`` naming the field. The trainer's
loader (megatron_alp/config) runs ``validate()`` on each nested section, children first; the
rollout package never imports the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {value}")


@dataclass
class SGLangConfig:
    """How SGLang servers are launched (ignored when `rollout.urls` attaches to running ones)."""

    python: Optional[str] = None
    """Python interpreter that runs `-m sglang.launch_server` (None = this interpreter)."""
    tp_size: int = 1
    """Tensor parallel size of each server (`--tp-size`)."""
    dp_size: int = 1
    """Data parallel replicas inside each server (`--dp-size`)."""
    mem_fraction_static: Optional[float] = None
    """GPU memory fraction for weights + KV cache (`--mem-fraction-static`; None = SGLang's default)."""
    deterministic: bool = False
    """Batch-invariant kernels (`--enable-deterministic-inference`): same output for any batching."""
    load_format: Optional[str] = None
    """`--load-format` (e.g. `dummy` for random weights that the first sync overwrites)."""
    enable_memory_saver: bool = False
    """`--enable-memory-saver` (release/resume GPU memory for colocated training)."""
    skip_tokenizer_init: bool = False
    """`--skip-tokenizer-init`: token ids only (no `text`, no stop strings)."""
    extra_args: List[str] = field(default_factory=list)
    """Further command-line flags passed through verbatim (e.g. ["--chunked-prefill-size", "4096"])."""
    router: bool = False
    """Launch `sglang_router` in front of the servers and send /generate through it."""
    router_port: int = 30999
    """Port of the launched router."""
    router_url: Optional[str] = None
    """Attach to a running router for /generate (weight updates still go to each server)."""

    def validate(self) -> None:
        for name in ("tp_size", "dp_size", "router_port"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.sglang.{name} must be >= 1, got {getattr(self, name)}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(
                f"rollout.sglang.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )


@dataclass
class ClientConfig:
    """The HTTP client every engine is reached through."""

    connect_timeout_s: float = 10.0
    """Timeout to open a connection to an engine."""
    request_timeout_s: float = 3600.0
    """Total timeout of one /generate call (long responses on a loaded engine take a while)."""
    control_timeout_s: float = 600.0
    """Timeout of control calls (pause, weight update, model_info)."""
    max_retries: int = 3
    """Retries of a request after a transient error (connection reset, 502/503/504, 429)."""
    retry_backoff_s: float = 0.5
    """First retry delay; doubles per retry (capped at 30 s, with jitter)."""
    max_connections: int = 1024
    """Pooled connections per engine."""

    def validate(self) -> None:
        _positive("rollout.client", self, "connect_timeout_s", "request_timeout_s",
                  "control_timeout_s", "max_connections")
        if self.max_retries < 0:
            raise ValueError(f"rollout.client.max_retries must be >= 0, got {self.max_retries}")
        if self.retry_backoff_s < 0:
            raise ValueError(f"rollout.client.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")


@dataclass
class LocalEngineConfig:
    """The CPU development engine (`python -m rollout.engines.local`)."""

    max_batch_size: int = 32
    """Sequences decoded together (new requests join a running batch up to this size)."""
    batch_wait_ms: float = 5.0
    """When idle, wait this long after the first request to collect concurrent ones."""
    threads: int = 1
    """torch intra-op threads of each engine process."""


@dataclass
class DataConfig:
    """Prompt datasets."""

    path: Optional[str] = None
    """JSONL or Parquet file of prompts (None = the caller provides prompts, e.g. a synthetic task)."""
    prompt_key: str = "prompt"
    """Column with the prompt: a string, or a list of chat messages {role, content} (dotted paths
    reach into nested records)."""
    label_key: str = "answer"
    """Column with the ground truth handed to the reward function; a dotted path reaches into nested
    records (`reward_model.ground_truth`, the verl layout). A record without it fails the load."""
    require_label: bool = True
    """Fail the load when a record has no label (False: such samples score 0, for label-free rewards)."""
    instruction: Optional[str] = None
    """Text prepended to the first user message (the reference's `data.prompt`): literal text, or a
    name from rollout/prompts.py (`simpletir`: the ALP multi-turn tool instruction)."""
    apply_chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one."""
    system_prompt: Optional[str] = None
    """System message prepended when the chat template is applied."""
    max_prompt_len: int = 1024
    """Prompts longer than this (in tokens) are dropped or truncated (see `overlong`)."""
    overlong: Literal["drop", "truncate"] = "drop"
    """What happens to a too-long prompt: drop it, or keep its last `max_prompt_len` tokens."""

    def validate(self) -> None:
        if self.max_prompt_len < 1:
            raise ValueError(f"rollout.data.max_prompt_len must be >= 1, got {self.max_prompt_len}")


@dataclass
class SandboxConfig:
    """Limits of the Python tool sandbox (multi-turn tool-integrated reasoning)."""

    timeout_s: float = 10.0
    """Wall-time limit of one code execution (the process group is killed after it)."""
    memory_mb: int = 1024
    """Address-space limit of the child (RLIMIT_AS)."""
    max_output_chars: int = 16384
    """Characters of stdout/stderr read back (before the token budget is applied)."""
    isolation: Literal["auto", "bwrap", "none"] = "auto"
    """`bwrap`: OS-level isolation with bubblewrap (namespaces, seccomp, read-only runtime; the
    security boundary; see docs/rollout.md). `none`: the unisolated fallback (a subprocess with
    resource limits and an audit hook, not a boundary), which refuses to run as root unless
    `allow_unisolated_root`. `auto`: bwrap when it works here, else the fallback (with a warning)."""
    allow_unisolated_root: bool = False
    """Let the unisolated fallback run model-written code while we are root (not recommended)."""
    user: str = "nobody"
    """When we are root: the unprivileged host user the sandbox (bwrap and the code) runs as."""
    max_processes: int = 32
    """Process/thread limit of one execution (RLIMIT_NPROC, counted per sandbox namespace)."""
    disk_mb: int = 64
    """Size of the private tmpfs work directory (bwrap isolation)."""
    network: Literal["auto", "namespace", "audit"] = "auto"
    """Unisolated fallback only (bwrap always gives a network namespace with only a downed
    loopback): a private network namespace (root), an audit hook refusing sockets, or `auto`."""
    drop_privileges: bool = True
    """Unisolated fallback only: when running as root, run the child as the user `nobody`."""
    max_concurrent: int = 4
    """Tool executions running at once in one rollout process."""

    def validate(self) -> None:
        _positive("rollout.sandbox", self, "timeout_s", "memory_mb", "max_output_chars", "max_concurrent",
                  "max_processes", "disk_mb")
        if self.isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"rollout.sandbox.isolation must be auto, bwrap or none, got {self.isolation!r}")


@dataclass
class MultiTurnConfig:
    """Tool-integrated reasoning: the model writes ```python blocks, their output comes back."""

    enabled: bool = False
    """Run multi-turn generation with the Python tool instead of single-turn."""
    max_turns: int = 5
    """Model turns per sample (a closed code block ends a turn; the last turn's block is not run)."""
    max_response_len: int = 1024
    """Budget of all response tokens of a sample (model and observation tokens together); each turn
    also stops at `rollout.max_new_tokens`."""
    observation_max_tokens: int = 256
    """Token budget of one tool observation; longer output is cut with a marker."""
    final_answer_func: bool = True
    """Define `final_answer(x)` (prints `\\boxed{x}`) before each code block, as the reference does."""

    def validate(self) -> None:
        _positive("rollout.multi_turn", self, "max_turns", "max_response_len", "observation_max_tokens")


@dataclass
class RolloutConfig:
    engine: Literal["local", "sglang"] = "local"
    """Which engine serves generation: the CPU development engine or SGLang servers."""
    urls: List[str] = field(default_factory=list)
    """Attach to running engines at these URLs instead of launching them."""
    num_engines: int = 1
    """How many engines to launch when `urls` is empty."""
    model_path: Optional[str] = None
    """HF checkpoint the launched engines load (None = the trainer passes model.hf_path)."""
    host: str = "127.0.0.1"
    """Bind address of launched engines (localhost unless configured otherwise)."""
    base_port: int = 30000
    """Port of the first launched engine; engine i uses base_port + i (0 = pick free ports)."""
    api_key: Optional[str] = None
    """API key required by weight-update endpoints (mandatory when host is not localhost)."""
    startup_timeout_s: float = 900.0
    """How long a launched engine may take to answer /health before the launch fails."""
    log_dir: Optional[str] = None
    """Directory of launched engines' logs (None = a temporary directory)."""
    seed: int = 1234
    """Engine random seed (`--random-seed`)."""
    weight_version: str = "0"
    """Weight version the engines report before the first update (`--weight-version`)."""
    n_samples: int = 8
    """Samples per prompt (GRPO group size)."""
    max_new_tokens: int = 64
    """Maximum response tokens per turn."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are computed at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 biases the ratio (ALGORITHMS.md top-p note) and warns."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    stop: List[str] = field(default_factory=list)
    """Stop strings (need an engine with a tokenizer)."""
    stop_token_ids: List[int] = field(default_factory=list)
    """Token ids that end a response in addition to the model's EOS."""
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"
    """Engine weight precision (fp8 = blockwise e4m3 weights, emulated on CPU)."""
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = "auto"
    """KV cache dtype passed to SGLang (the local engine keeps its cache in the compute dtype)."""
    max_concurrent_requests: int = 512
    """/generate requests in flight across the fleet (client-side back-pressure)."""
    max_staleness: int = 0
    """Asynchronous rollout (docs/trainer.md): 0 = generate, then train, in series; k >= 1 = the
    engines keep generating while the trainer trains, and step s trains only on groups generated
    by weight versions >= s - k."""
    span_policy: Literal["reissue", "keep"] = "reissue"
    """Asynchronous rollout: a response whose generation spans a weight update is aborted and
    re-issued on the new weights (reissue), or paused in place and continued on them (keep; its
    staleness counts from the version it started on). See rollout/producer.py."""
    reward: str = "math"
    """Reward function: `math` (math-verify on the boxed answer), `synthetic`, or a dotted path
    `package.module:function` (signature in docs/rollout.md)."""
    reward_workers: int = 4
    """Processes that score rewards (off the event loop, killable); 0 = score inline. The built-in
    `synthetic` reward and async reward functions always run inline."""
    reward_timeout_s: float = 120.0
    """Hard limit of one reward call in a worker (the reference's 120 s); past it the sample scores 0."""
    reward_on_error: Literal["fail_sample", "stop"] = "fail_sample"
    """A reward function that raises or returns NaN/inf: `fail_sample` scores that sample
    `reward_failed_value` (counted in `rollout/reward_failures`); `stop` ends the run with a
    checkpoint and a one-line error."""
    reward_failed_value: float = 0.0
    """The reward of a sample whose reward function failed (`reward_on_error: fail_sample`)."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """SGLang launch options."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """HTTP client options."""
    local: LocalEngineConfig = field(default_factory=LocalEngineConfig)
    """CPU development engine options."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt dataset."""
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)
    """Multi-turn tool-integrated reasoning."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Python tool sandbox limits."""

    def _validate_scheduling(self) -> None:
        """Reward workers and asynchronous rollout."""
        if self.reward_workers < 0:
            raise ValueError(f"rollout.reward_workers must be >= 0, got {self.reward_workers}")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.span_policy not in ("reissue", "keep"):
            raise ValueError(f"rollout.span_policy must be reissue or keep, got {self.span_policy!r}")

    def validate(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"rollout.n_samples must be >= 1, got {self.n_samples}")
        if self.num_engines < 1 and not self.urls:
            raise ValueError(f"rollout.num_engines must be >= 1, got {self.num_engines}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"rollout.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not math.isfinite(self.reward_failed_value):
            raise ValueError(f"rollout.reward_failed_value must be finite, got {self.reward_failed_value}")
        if self.host not in LOCAL_HOSTS and not self.api_key:
            raise ValueError(f"rollout.host = {self.host} exposes the engines: set rollout.api_key")
        if not 0 <= self.base_port < 65536:
            raise ValueError(f"rollout.base_port must be in [0, 65535], got {self.base_port}")
        _positive("rollout", self, "startup_timeout_s", "max_concurrent_requests", "reward_timeout_s")
        self._validate_scheduling()
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout.urls: '{url}' is not an http(s) URL")
        if self.engine == "sglang" and self.sglang.router and self.api_key:
            raise ValueError("rollout.sglang.router cannot be combined with rollout.api_key (router key "
                             "forwarding differs between sglang-router releases): attach with router_url")
        if self.multi_turn.enabled and self.engine == "sglang" and self.sglang.skip_tokenizer_init:
            raise ValueError(
                "rollout.multi_turn needs stop strings, which rollout.sglang.skip_tokenizer_init disables"
            )
