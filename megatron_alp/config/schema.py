"""The one typed config tree. Each component receives only its own section.

Every field has a docstring (the string literal under it). Cross-field checks live in each
section's ``validate()`` and in :meth:`Config.validate`; they raise ``ValueError`` naming fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

from rollout.config import RolloutConfig
from rollout.eval.config import EvalConfig

from ..algo.config import AlgorithmConfig


def _at_least(section: str, obj, low, *names: str) -> None:
    """Each named field (None = unset, skipped) must be >= ``low``."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= low:  # `not >=` also refuses NaN
            raise ValueError(f"{section}.{name} must be >= {low}, got {value}")


def _finite(section: str, obj, *names: str) -> None:
    import math

    for name in names:
        value = getattr(obj, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{section}.{name} must be finite, got {value}")


@dataclass
class ModelConfig:
    family: Literal["qwen2", "qwen3", "llama"] = "qwen2"
    """HF model family (`model_type` in config.json): qwen2 (QKV bias), qwen3 (QK-norm), llama."""
    num_layers: int = 2
    """Decoder layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """SwiGLU intermediate size."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None = multi-head attention."""
    head_dim: Optional[int] = None
    """Per-head size; None = hidden_size / num_attention_heads (Qwen3 sets it explicitly)."""
    vocab_size: int = 256
    """The real vocabulary size (what tokenizers and rollout engines see; no padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this x TP, as Megatron does (padding is trainer-only)."""
    max_position_embeddings: int = 512
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1 style RoPE scaling factor (None = no scaling)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qkv_bias: bool = True
    """Bias on the QKV projection (Qwen2/2.5)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys (Qwen3)."""
    tie_embeddings: bool = False
    """Share input embedding and output layer (small Qwen2.5 models)."""
    init_std: float = 0.02
    """Std of the random init (only used without a checkpoint)."""
    hf_path: Optional[str] = None
    """HF checkpoint this model comes from (tokenizer, config.json for export)."""

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError(
                f"model.hidden_size = {self.hidden_size} is not divisible by "
                f"model.num_attention_heads = {self.num_attention_heads}; set model.head_dim"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads = {self.num_attention_heads} is not divisible by "
                f"model.num_query_groups = {groups}"
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    dp: Optional[int] = None
    """Data-parallel size; None = world_size / (tp x pp x cp). When set, it must match."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation."""
    recompute_num_layers: int = 1
    """Layers per recompute chunk (full recompute, uniform method)."""
    pg_timeout_minutes: float = 60.0
    """Timeout of the trainer's collectives (default group and Megatron's groups): a rank stuck longer
    than this ends the job. Waits on rank 0's rollout use run.rollout_timeout_minutes instead."""

    def validate(self) -> None:
        if self.pg_timeout_minutes <= 0:
            raise ValueError(f"parallel.pg_timeout_minutes must be > 0, got {self.pg_timeout_minutes}")
        _at_least("parallel", self, 1, "tp", "pp", "cp", "dp", "recompute_num_layers")


@dataclass
class PrecisionConfig:
    train: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"
    """Training compute dtype; fp8 needs Transformer Engine and a GPU."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "blockwise"
    """FP8 scaling recipe (train = fp8 only)."""
    fp8_keep_first_last_bf16: bool = True
    """Keep the first and last decoder layers in bf16 under FP8 training."""
    initial_loss_scale: float = 65536.0
    """fp16 dynamic loss scaling start value."""

    def validate(self) -> None:
        if self.train == "fp8" and self.fp8_recipe == "delayed" and self.fp8_keep_first_last_bf16:
            # Megatron's TransformerConfig raises the same inside __post_init__ (transformer_config.py:
            # "Delayed scaling does not support first / last layer in BF16"): say it at config load.
            raise ValueError("precision.fp8_recipe = delayed cannot keep the first/last layers in bf16 (Megatron "
                             "refuses it): set precision.fp8_keep_first_last_bf16 = false or use fp8_recipe = "
                             "tensorwise or blockwise")
        if self.train == "fp8":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("precision.train = fp8 needs a CUDA GPU (none is available)")
            try:
                import transformer_engine  # noqa: F401
            except ImportError:
                raise ValueError(
                    "precision.train = fp8 needs Transformer Engine: pip install 'megatron-alp[gpu]'"
                ) from None


@dataclass
class AlpConfig:
    enabled: bool = False
    """Perturb the policy-update forward (ALP). Off = plain model."""
    sigma_init: float = 0.02
    """Initial noise scale sigma (per layer)."""
    sigma_lr: float = 1e-2
    """Learning rate of the log-sigma parameter group."""
    sigma_weight_decay: float = 0.0
    """Weight decay on log-sigma (the reference decays it with AdamW; we default to none)."""
    learnable: bool = True
    """Train sigma by the policy loss; false keeps it fixed at sigma_init."""
    target: Literal["layers", "logits"] = "layers"
    """Where noise goes: decoder-layer inputs, or only the final hidden state (logits-only)."""
    layers: Union[str, List[int]] = "all"
    """Perturbed layers: 'all', 'first:K', 'last:K', 'early', 'middle', 'late', or a list of global indices."""
    seed: int = 1234
    """Base seed of the perturbation noise."""

    def validate(self) -> None:
        if self.sigma_init <= 0:
            raise ValueError(f"alp.sigma_init must be > 0 (sigma = exp(log_sigma)), got {self.sigma_init}")
        if isinstance(self.layers, str):
            ok = self.layers in ("all", "early", "middle", "late") or (
                self.layers.split(":")[0] in ("first", "last") and self.layers.split(":")[-1].isdigit()
            )
            if not ok:
                raise ValueError(
                    f"alp.layers = {self.layers!r}: expected 'all', 'first:K', 'last:K', 'early', "
                    f"'middle', 'late' or a list of layer indices"
                )


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate of the model weights."""
    min_lr: float = 0.0
    """Final learning rate of the schedule."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on the model weights."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""

    def validate(self) -> None:
        _finite("optimizer", self, "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")
        _at_least("optimizer", self, 0, "lr", "min_lr", "warmup_steps", "weight_decay", "clip_grad",
                  "adam_beta1", "adam_beta2")
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) >= 1:
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"optimizer.adam_eps must be > 0, got {self.adam_eps}")
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr = {self.min_lr} is above optimizer.lr = {self.lr}")


@dataclass
class BusConfig:
    backend: Literal["disk", "nccl", "tensor"] = "disk"
    """How weights reach the engines: disk (shared filesystem), nccl (broadcast; gloo on CPU), tensor (colocated
    CUDA IPC)."""
    dir: str = "runs/bus"
    """Root of the disk bus (a shared filesystem on a cluster); engines are launched on its versions."""
    keep: int = 3
    """Versions kept on disk (>= 2 keeps the version the engines run while the next one commits)."""
    bucket_mb: int = 512
    """Export bucket size: the largest shard file (disk) or broadcast (nccl) in MiB."""
    on_engine_failure: Literal["drop", "stop"] = "drop"
    """An engine that fails to apply after retries is removed, or the run stops."""
    retries: int = 1
    """Extra apply attempts per engine before on_engine_failure applies."""
    verify: bool = True
    """Re-read a disk version and check every tensor's checksum on the driver before the engines load it
    (SGLang does not check the manifest; the local engine always does)."""
    checksum: Literal["xxh3_128", "sha256"] = "xxh3_128"
    """Per-tensor checksum written into a disk version's manifest: xxh3_128 (xxhash, ~10 GB/s per core;
    catches torn and corrupted files, not deliberate tampering) or sha256 (cryptographic, ~1.1 GB/s per
    core). Readers always verify with the algorithm the manifest names."""
    fsync: bool = False
    """fsync shards and directories before the atomic rename (host-crash durability; checksums catch torn files
    anyway)."""
    master_address: Optional[str] = None
    """Address the engines reach the trainer's broadcast groups at (nccl backend), the same for every
    stage: only for senders on one node. None (default) = each sender's node address: its interface
    named by NCCL_SOCKET_IFNAME (GLOO_SOCKET_IFNAME on CPU), else its route to the first engine."""
    timeout_s: float = 600.0
    """Timeout of forming a broadcast group and of one broadcast (nccl backend)."""

    def validate(self) -> None:
        for name in ("keep", "bucket_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"bus.{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0:
            raise ValueError(f"bus.retries must be >= 0, got {self.retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"bus.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory (None = <run.output_dir>/checkpoints)."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end and on SIGTERM)."""
    load: Optional[str] = None
    """Resume from this checkpoint directory, or the Megatron checkpoint of a converted HF model."""
    keep: int = 0
    """Keep the newest N complete checkpoints, deleting older ones after each save (0 = keep all).
    The one being written and the last complete one are never deleted."""

    def validate(self) -> None:
        for name in ("save_interval", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under <run.output_dir>/tensorboard."""
    log_interval: int = 1
    """Terminal line every N steps."""
    histograms: bool = True
    """Log-ratio and sigma histograms."""
    raw_samples: bool = False
    """Also write every histogram metric's values (e.g. each token's log pi/mu of the step, up to the
    metrics' 4096-value subsample) to <run dir>/hist_samples.jsonl, one line per step, for exact
    quantiles pooled over steps and runs (tools/staleness_study.py)."""
    mismatch_metrics: bool = True
    """Log mismatch/* (unperturbed pi_theta_old vs the rollout policy mu at the start of each step).
    Where the objective does not recompute pi_old this costs one extra no-grad forward per step;
    false skips it and logs nothing under mismatch/."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name (the output directory's name under output_root)."""
    output_root: str = "runs"
    """Where run directories are created."""
    seed: int = 1234
    """Global seed."""
    steps: int = 10
    """RL steps (rollout + updates)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch."""
    mini_batches_per_step: int = 1
    """Optimizer steps per rollout batch (policy staleness)."""
    micro_batch_size: int = 4
    """Sequences per micro-batch (padded micro-batches)."""
    max_tokens_per_micro_batch: int = 0
    """Sequence packing (docs/trainer.md): > 0 = samples packed end to end into micro-batches of at
    most this many tokens (micro_batch_size is then unused); 0 = padded micro-batches."""
    fuse_old_logp: bool = True
    """Where the first update's forward is unperturbed (ALP off), its detached log-probs serve as
    pi_old (and the mismatch metrics' pi_theta_old) for the first mini-batch's rows, and the
    no-grad pass covers only the other mini-batches (none with one optimizer step per rollout):
    exact, the weights are pi_old's at that step (trainer/updates.py). false: the separate pass."""
    max_nonfinite_steps: int = 3
    """Consecutive non-finite losses after which the run stops."""
    rollout_timeout_minutes: float = 180.0
    """How long the other ranks wait for rank 0's rollout (a gloo group of its own): long-CoT and
    multi-turn rollouts take longer than parallel.pg_timeout_minutes (slime's scripts: 60-120 min)."""

    def validate(self) -> None:
        if self.rollout_timeout_minutes <= 0:
            raise ValueError(f"run.rollout_timeout_minutes must be > 0, got {self.rollout_timeout_minutes}")
        _at_least("run", self, 0, "steps")
        _at_least("run", self, 1, "prompts_per_step", "mini_batches_per_step", "micro_batch_size",
                  "max_nonfinite_steps")
        if (not self.name.strip() or self.name in (".", "..") or "/" in self.name or "\\" in self.name
                or "\0" in self.name):
            raise ValueError(f"run.name must be a plain directory name (no path separators), got {self.name!r}")

    @property
    def output_dir(self) -> str:
        import os

        return os.path.join(self.output_root, self.name)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Training precision (rollout precision is rollout.precision)."""
    alp: AlpConfig = field(default_factory=AlpConfig)
    """Adaptive Layerwise Perturbation."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Objective and advantages."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engines and sampling."""
    bus: BusConfig = field(default_factory=BusConfig)
    """Checkpoint bus."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Monitoring."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmark evaluation between steps and after the last one (docs/eval.md)."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run itself."""

    def _validate_bus_engines(self) -> None:
        r = self.rollout
        if self.bus.backend == "nccl" and r.engine == "sglang" and r.sglang.dp_size > 1:
            # SGLang 0.5.23 TokenizerManager.init_weights_update_group asserts dp_size == 1
            raise ValueError(f"bus.backend = nccl needs rollout.sglang.dp_size = 1 (got {r.sglang.dp_size}): SGLang "
                             f"refuses update_weights_from_distributed with data-parallel replicas; use more engines "
                             f"(rollout.num_engines) instead of dp_size, or bus.backend = disk")

    def validate(self) -> None:
        self._validate_bus_engines()
        m, p = self.model, self.parallel
        if p.sequence_parallel and p.tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1 (got tp = 1)")
        if m.num_attention_heads % p.tp:
            raise ValueError(
                f"model.num_attention_heads = {m.num_attention_heads} is not divisible by parallel.tp = {p.tp}"
            )
        if (m.num_query_groups or m.num_attention_heads) % p.tp:
            raise ValueError(
                f"model.num_query_groups = {m.num_query_groups} is not divisible by parallel.tp = {p.tp}"
            )
        if m.num_layers % p.pp:
            raise ValueError(f"model.num_layers = {m.num_layers} is not divisible by parallel.pp = {p.pp}")
        if isinstance(self.alp.layers, list):
            bad = [i for i in self.alp.layers if not 0 <= i < m.num_layers]
            if bad:
                raise ValueError(f"alp.layers has indices {bad} outside [0, model.num_layers = {m.num_layers})")
        if self.run.micro_batch_size < 1:
            raise ValueError(f"run.micro_batch_size must be >= 1, got {self.run.micro_batch_size}")
        if self.run.max_tokens_per_micro_batch < 0:
            raise ValueError(f"run.max_tokens_per_micro_batch must be >= 0 (0 = padding), got "
                             f"{self.run.max_tokens_per_micro_batch}")
