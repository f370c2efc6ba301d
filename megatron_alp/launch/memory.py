"""Rough per-GPU memory estimates: the trainer (Megatron, distributed optimizer) and SGLang engines.

Rough on purpose: the numbers decide a layout (does TP x PP fit an 80 GB GPU?), not a batch size.
Bytes per parameter on a trainer GPU (Megatron with bf16 params, ``grad_reduce_in_fp32`` and the
distributed optimizer, as megatron_alp/trainer/optim.py builds it on GPUs):

    weights 2 (bf16) + main grads 4 (fp32 buffer) + (fp32 master 4 + Adam m 4 + Adam v 4) / DP

(fp32 training: weights 4 + grads 4 + (m 4 + v 4) / DP). Parameters per GPU are those of the most
loaded pipeline stage (its layers plus the embedding or the output layer) divided by TP.

Activations per micro-batch and layer, bf16, flash attention (no s x s scores stored), SwiGLU MLP
(ffn F), GQA (g key/value heads of size d), tokens T = micro_batch_size x longest sequence:

    T x [ 8h / (TP if SP else 1)  +  (4h + 4 g d + 6F) / TP ]   bytes

(the two norm inputs, the QKV and fc1 inputs and the residual are replicated over TP unless sequence
parallelism shards them; Q/K/V, the attention output, gate/up and the SwiGLU output are TP-sharded;
the count follows Korthikanti et al. 2022, "Reducing Activation Recomputation", without its 5as/h
term). Full recomputation keeps only each layer's input (2h / TP bytes per token with SP) plus one
layer's working set. Under 1F1B the first stage holds min(PP, micro-batches) micro-batches in
flight. The last stage adds the logits: T x V / TP x 12 bytes (bf16 logits, the fp32 log-softmax
working copy, one extra fp32 buffer, bf16 gradient). A fixed 5 GB covers the CUDA context, NCCL
buffers and workspaces. ALP adds one scalar per layer and regenerates its noise (nothing stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

GB = 1e9
OVERHEAD_GB = 5.0
"""CUDA context, NCCL buffers, cuBLAS/attention workspaces (per GPU)."""
LOGITS_BYTES = 12
"""Bytes per logits element on the last stage (see the module docstring)."""
SGLANG_DEFAULT_MEM_FRACTION = 0.85
"""What we assume for ``--mem-fraction-static`` when the config leaves SGLang's default."""


def layer_params(m) -> int:
    """Parameters of one decoder layer of a :class:`ModelConfig`."""
    h, f = m.hidden_size, m.ffn_hidden_size
    d = m.head_dim or h // m.num_attention_heads
    q, kv = m.num_attention_heads * d, (m.num_query_groups or m.num_attention_heads) * d
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if m.qkv_bias else 0) + (2 * d if m.qk_layernorm else 0)
    return attn + 3 * h * f + 2 * h  # + the two RMSNorm weights


def model_params(m) -> int:
    """All parameters (embedding, layers, final norm, output layer unless tied)."""
    embed = m.vocab_size * m.hidden_size
    return m.num_layers * layer_params(m) + embed * (1 if m.tie_embeddings else 2) + m.hidden_size


def stage_params(m, tp: int, pp: int) -> float:
    """Parameters on one GPU of the most loaded pipeline stage."""
    embed = m.vocab_size * m.hidden_size
    layers = m.num_layers // pp * layer_params(m)
    if pp == 1:
        return (layers + embed * (1 if m.tie_embeddings else 2)) / tp
    return (layers + embed) / tp  # first stage: embedding; last stage: output layer (same size)


def activation_bytes_per_token_layer(m, tp: int, sp: bool) -> float:
    h, f = m.hidden_size, m.ffn_hidden_size
    d = m.head_dim or h // m.num_attention_heads
    g = m.num_query_groups or m.num_attention_heads
    return 8 * h / (tp if sp else 1) + (4 * h + 4 * g * d + 6 * f) / tp


@dataclass
class TrainerMemory:
    params_per_gpu: float
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float
    reference_gb: float
    overhead_gb: float
    tokens_per_micro_batch: int

    @property
    def total_gb(self) -> float:
        return (self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb + self.logits_gb
                + self.reference_gb + self.overhead_gb)

    def lines(self) -> List[str]:
        return [f"parameters per GPU     {self.params_per_gpu / 1e9:8.2f} B",
                f"weights                {self.weights_gb:8.1f} GB",
                f"main grads (fp32)      {self.grads_gb:8.1f} GB",
                f"optimizer (/DP)        {self.optimizer_gb:8.1f} GB",
                f"activations            {self.activations_gb:8.1f} GB  "
                f"({self.tokens_per_micro_batch} tokens per micro-batch)",
                f"logits (last stage)    {self.logits_gb:8.1f} GB",
                f"reference model        {self.reference_gb:8.1f} GB",
                f"overhead               {self.overhead_gb:8.1f} GB",
                f"total per GPU          {self.total_gb:8.1f} GB"]


def max_sequence_len(cfg) -> int:
    """Longest trained sequence: the prompt limit plus the response budget."""
    r = cfg.rollout
    response = r.multi_turn.max_response_len if r.multi_turn.enabled else r.max_new_tokens
    return r.data.max_prompt_len + response


def estimate_trainer(cfg, dp: int, precision: Optional[str] = None) -> TrainerMemory:
    """Per-GPU estimate for the config's model and parallel layout at data-parallel size ``dp``.

    ``precision`` overrides ``cfg.precision.train`` (the dry run checks a GPU config on a CPU)."""
    m, p = cfg.model, cfg.parallel
    precision = precision or cfg.precision.train
    tp, pp = p.tp, p.pp
    params = stage_params(m, tp, pp)
    half = precision in ("bf16", "fp16", "fp8")
    weights = params * (2 if half else 4)
    grads = params * 4
    optimizer = params * (12 if half else 8) / max(dp, 1)
    budget = cfg.run.max_tokens_per_micro_batch  # packing: the budget (a longer sample travels alone)
    tokens = (max(budget, max_sequence_len(cfg)) if budget else cfg.run.micro_batch_size * max_sequence_len(cfg)) \
        // max(p.cp, 1)
    per_layer = tokens * activation_bytes_per_token_layer(m, tp, p.sequence_parallel)
    layers = m.num_layers // pp
    micro_per_mini = _micro_batches_per_mini(cfg, dp)
    in_flight = min(pp, micro_per_mini) if pp > 1 else 1
    if p.recompute == "full":
        checkpoint = tokens * 2 * m.hidden_size / (tp if p.sequence_parallel else 1)
        acts = layers * checkpoint * in_flight + per_layer
    else:
        acts = layers * per_layer * in_flight
    vocab = -(-m.vocab_size // (m.make_vocab_size_divisible_by * tp)) * m.make_vocab_size_divisible_by * tp
    logits = tokens * vocab / tp * LOGITS_BYTES
    reference = params * 2 if cfg.algorithm.kl_coef > 0 else 0.0
    return TrainerMemory(params, weights / GB, grads / GB, optimizer / GB, acts / GB, logits / GB,
                         reference / GB, OVERHEAD_GB, tokens)


def _micro_batches_per_mini(cfg, dp: int) -> int:
    run = cfg.run
    per_dp = run.prompts_per_step * cfg.rollout.n_samples // max(dp, 1)
    return max(1, per_dp // max(run.mini_batches_per_step, 1) // max(run.micro_batch_size, 1))


@dataclass
class EngineMemory:
    weights_gb: float
    budget_gb: float
    kv_bytes_per_token: float
    kv_tokens: int
    sequence_len: int

    @property
    def kv_gb(self) -> float:
        return max(self.budget_gb - self.weights_gb, 0.0)

    def lines(self) -> List[str]:
        return [f"weights per GPU        {self.weights_gb:8.1f} GB",
                f"static budget          {self.budget_gb:8.1f} GB  (mem_fraction_static x GPU memory)",
                f"KV cache               {self.kv_gb:8.1f} GB  = {self.kv_tokens:,} tokens "
                f"({self.kv_bytes_per_token / 1024:.0f} KiB per token per GPU)",
                f"full-length sequences  {self.kv_tokens // max(self.sequence_len, 1):8d}  "
                f"at {self.sequence_len} tokens"]


def estimate_engine(cfg, model_params_count: int, gpu_mem_gb: float) -> EngineMemory:
    """SGLang: weights sharded over the engine's TP; the KV cache gets the rest of the static budget."""
    r, m = cfg.rollout, cfg.model
    tp = r.sglang.tp_size
    wbytes = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}[r.precision]
    weights = model_params_count * wbytes / tp / GB
    frac = r.sglang.mem_fraction_static or SGLANG_DEFAULT_MEM_FRACTION
    budget = frac * gpu_mem_gb
    d = m.head_dim or m.hidden_size // m.num_attention_heads
    g = m.num_query_groups or m.num_attention_heads
    kv_dtype_bytes = 1 if r.kv_cache_dtype == "fp8_e4m3" else 2
    kv_per_token = 2 * m.num_layers * max(g // tp, 1) * d * kv_dtype_bytes  # K and V, this GPU's heads
    kv_tokens = int(max(budget - weights, 0.0) * GB / kv_per_token)
    return EngineMemory(weights, budget, kv_per_token, kv_tokens, max_sequence_len(cfg))
