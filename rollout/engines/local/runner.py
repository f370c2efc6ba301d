"""The local engine's model: loading, precision, batched prefill/decode with a shared KV cache.

Rows of a batch are left-padded; each row keeps its own RoPE positions (``position_ids``) and a
2-D attention mask, so sequences of different lengths decode together and new requests can join
a running batch (their KV cache is left-padded to the batch's length and concatenated). Finished
rows leave the batch (``batch_select_indices``) and all-padding columns are trimmed.

Log-probs follow SGLang: ``log_softmax(logits / T)`` of the full vocabulary in fp32, *before*
top-k / top-p / min-p filtering; greedy requests (T ~ 0) use T = 1 for the log-prob.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

import torch

from .fp8 import apply_fp8_emulation, dequantize_fp8_state, requantize_weights
from .prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
GREEDY_EPS = 1e-6


@dataclass
class Request:
    """One sequence being generated (a /generate item)."""

    rid: str
    input_ids: List[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_ids: Set[int] = field(default_factory=set)
    stop_strs: List[str] = field(default_factory=list)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    generator: Optional[torch.Generator] = None
    output_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[list] = field(default_factory=list)
    input_logprobs: List[list] = field(default_factory=list)
    finish: Optional[Dict[str, Any]] = None
    matched_str: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    options: Dict[str, Any] = field(default_factory=dict)  # the normalized sampling_params
    on_token: Optional[Any] = None  # called (worker thread) after each generated token, for streaming


def _unfiltered(r: "Request", vocab: int) -> bool:
    """A request sampled from the full distribution: temperature > 0, no top-k/top-p/min-p cut."""
    return (r.temperature > GREEDY_EPS and r.top_p >= 1.0 and r.min_p <= 0.0
            and (r.top_k <= 0 or r.top_k >= vocab))


def _wants_input_logprobs(r: "Request") -> bool:
    """The request asks for prompt log-probs (from ``logprob_start_len``) in this prefill."""
    return r.return_logprob and r.logprob_start_len >= 0 and not r.output_ids


@dataclass
class Batch:
    """Rows decoding together: their requests, KV cache, mask, next positions and pending tokens."""

    reqs: List[Request]
    cache: Any
    mask: torch.Tensor  # [B, S] 1 = real token
    pos: torch.Tensor  # [B] position of the pending token
    pending: torch.Tensor  # [B] last sampled token, not yet fed

    def __len__(self) -> int:
        return len(self.reqs)


class LocalModel:
    """An HF causal LM held for generation (no grad), with the engine's precision applied."""

    def __init__(self, model_path: str, precision: str = "fp32", seed: int = 0,
                 prefix_cache_tokens: int = 1 << 16, reference: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self._cache_cls = DynamicCache
        self.model_path = self.tokenizer_path = model_path
        self.weights_epoch = 0  # +1 per weight load: tells which weights computed a cached KV
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.precision = precision
        # reference: the plain per-row paths (sampling row by row, every repeat prefilled), kept to
        # check the batched ones against and as bench.rollout_demo's baseline; same results either way
        self.reference = reference
        self.dtype = DTYPES[precision]
        config = AutoConfig.from_pretrained(model_path)
        quant = getattr(config, "quantization_config", None) or {}
        if (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)) == "fp8":
            # A block-FP8 checkpoint (an FP8 bus version): transformers' FP8 loader needs a GPU, so
            # build the model in our dtype and load the dequantized weights ourselves.
            del config.quantization_config
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
            self.fp8_names = []
            self.load_weights_from_dir(model_path)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.config = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        self.max_len = int(getattr(self.config, "max_position_embeddings", 4096))
        self.fp8_names = apply_fp8_emulation(self.model, reference) if precision == "fp8" else []
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as e:  # a checkpoint without tokenizer serves input_ids only
            logger.warning("no tokenizer in %s (%s): text and stop strings are unavailable", model_path, e)
            self.tokenizer = None
        self.eos_ids = self._eos_ids()
        self.generator = torch.Generator().manual_seed(seed)
        logger.info("loaded %s (%s, vocab %d, eos %s)", model_path, precision, self.vocab_size, sorted(self.eos_ids))

    def _eos_ids(self) -> Set[int]:
        ids: Set[int] = set()
        for src in (self.config, getattr(self.model, "generation_config", None)):
            eos = getattr(src, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {int(i) for i in ids}

    # -- weights ---------------------------------------------------------------------------
    def read_weights_dir(self, path: str) -> Dict[str, torch.Tensor]:
        """Every tensor of ``path``'s ``*.safetensors``; a bus version is checked against its
        manifest (a checksum per tensor, with the algorithm the manifest names) and a mismatch raises
        naming the tensor."""
        from safetensors.torch import load_file

        from ...bus.disk import hash_pool, iter_verified_files
        from ...bus.manifest import has_manifest

        tensors: Dict[str, torch.Tensor] = {}
        if has_manifest(path):
            with hash_pool() as pool:
                for part in iter_verified_files(path, pool=pool):
                    tensors.update(part)
            return tensors
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
        for f in files:
            tensors.update(load_file(f))
        return tensors

    def load_weights_from_dir(self, path: str, complete: bool = False) -> int:
        """Load every ``*.safetensors`` of ``path`` into the model (names and shapes must match);
        with ``complete`` every parameter of the model must be there (a partial directory would
        leave a mix of old and new weights)."""
        tensors = self.read_weights_dir(path)
        if complete:
            have = {n for n in tensors if not n.endswith(".weight_scale_inv")}
            missing = sorted(n for n, _ in self.model.named_parameters() if n not in have)
            if missing:
                raise KeyError(f"{path} lacks {len(missing)} of the model's {len(list(self.model.parameters()))} "
                               f"tensors, e.g. {missing[:3]}")
        return self.load_tensors(tensors)

    def load_tensors(self, tensors: Dict[str, torch.Tensor]) -> int:
        """Copy named tensors into the model, all or nothing: every name and shape is checked
        before the first copy, so a refused update leaves the old weights in place."""
        tensors = dequantize_fp8_state(tensors)
        params = self.model.state_dict()
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise KeyError(f"{len(unknown)} tensor(s) not in the model, e.g. {unknown[:3]}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != model {tuple(params[name].shape)}")
        with torch.no_grad():
            self.weights_epoch += 1
            for name, t in tensors.items():
                params[name].copy_(t.to(params[name].dtype))
        if self.fp8_names:
            requantize_weights(self.model, self.fp8_names)
        return len(tensors)

    def get_weight(self, name: str) -> torch.Tensor:
        params = self.model.state_dict()
        if name not in params:
            raise KeyError(f"no parameter {name!r}")
        return params[name]

    # -- forward and sampling --------------------------------------------------------------
    def _forward(self, ids, mask, pos, cache, all_logits: bool = False) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=0 if all_logits else 1)
        quant = getattr(self.model, "_fp8_activation_quant", None)
        if quant is not None:
            quant.clear()  # release the last activation it remembered
        return out.logits.float()

    def _sample(self, logits: torch.Tensor, reqs: List[Request]) -> List[int]:
        """Sample one token per row; record log-probs with SGLang's semantics."""
        temps = torch.tensor([r.temperature if r.temperature > GREEDY_EPS else 1.0 for r in reqs])
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)
        tokens = [0] * len(reqs)
        done = set() if self.reference else self._sample_plain(logp, reqs, tokens)
        for i, r in enumerate(reqs):
            if i in done:
                continue
            try:
                tokens[i] = self._sample_row(logits[i], logp[i], r)
            except Exception as e:  # this request fails alone; its row samples nothing more
                logger.exception("sampling failed for request %s", r.rid)
                r.finish = {"type": "abort", "message": f"sampling failed: {type(e).__name__}: {e}"}
                tokens[i] = 0
        return tokens

    def _sample_plain(self, logp: torch.Tensor, reqs: List[Request], tokens: List[int]) -> Set[int]:
        """The rows without top-k / top-p / min-p filtering, drawn together (the rows it returns).

        ``torch.multinomial(p, 1, generator=g)`` is ``argmax(p / q)`` with ``q = empty_like(p).exponential_(1, g)``
        (ATen's single-sample path, aten/src/ATen/native/Distributions.cpp), after checking ``p``.
        So each row draws its own ``q`` from its own generator, exactly as :meth:`_sample_row` would,
        and one division and one argmax serve all rows: the same tokens and generator states as row
        by row. A row multinomial would refuse (not finite, zero sum) is left to :meth:`_sample_row`,
        which fails it alone without touching its generator, as before."""
        vocab = logp.shape[-1]
        rows = [i for i, r in enumerate(reqs) if _unfiltered(r, vocab)]
        # rows without a generator of their own share the engine's: batch them only if no other row
        # draws from it, so that its draws keep the row order of the row-by-row sampler
        if any(r.generator is None and r.temperature > GREEDY_EPS and r.top_k != 1 and not _unfiltered(r, vocab)
               for r in reqs):
            rows = [i for i in rows if reqs[i].generator is not None]
        if not rows:
            return set()
        probs = torch.empty(len(rows), vocab)
        for j, i in enumerate(rows):
            torch.exp(logp[i], out=probs[j])  # each row's own exp, as in _sample_row
        ok = (torch.isfinite(probs).all(1) & (probs.sum(1) > 0)).tolist()
        keep = [j for j in range(len(rows)) if ok[j]]
        if len(keep) < len(rows):
            probs, rows = probs[keep], [rows[j] for j in keep]
        q = torch.empty_like(probs)
        for j, i in enumerate(rows):
            q[j].exponential_(1.0, generator=reqs[i].generator or self.generator)
        drawn = torch.argmax(probs / q, dim=-1)
        toks = drawn.tolist()
        wants = [j for j, i in enumerate(rows) if reqs[i].return_logprob]
        lps = logp[torch.tensor([rows[j] for j in wants], dtype=torch.long), drawn[wants]].tolist() if wants else []
        for j, lp in zip(wants, lps, strict=True):
            reqs[rows[j]].logprobs.append(lp)
        for j, i in enumerate(rows):
            tokens[i] = toks[j]
            r = reqs[i]
            if r.return_logprob and r.top_logprobs_num > 0:
                v, ix = torch.topk(logp[i], min(r.top_logprobs_num, vocab))
                r.top_logprobs.append([[float(a), int(b), None] for a, b in zip(v, ix, strict=True)])
        return set(rows)

    def _sample_row(self, logits: torch.Tensor, logp: torch.Tensor, r: Request) -> int:
        if r.temperature <= GREEDY_EPS or r.top_k == 1:
            tok = int(torch.argmax(logits))
        else:
            probs = logp.exp()
            if 0 < r.top_k < probs.numel():
                kth = torch.topk(probs, r.top_k).values[-1]
                probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
            if r.top_p < 1.0:
                sp, idx = torch.sort(probs, descending=True)
                cum = torch.cumsum(sp, 0) / sp.sum()
                drop = (cum - sp / sp.sum()) >= r.top_p  # keep the smallest prefix reaching top_p
                probs = probs.scatter(0, idx[drop], 0.0)
            if r.min_p > 0.0:
                probs = torch.where(probs >= r.min_p * probs.max(), probs, torch.zeros_like(probs))
            tok = int(torch.multinomial(probs, 1, generator=r.generator or self.generator))
        if r.return_logprob:
            r.logprobs.append(float(logp[tok]))
            if r.top_logprobs_num > 0:
                v, ix = torch.topk(logp, min(r.top_logprobs_num, logp.shape[-1]))
                r.top_logprobs.append([[float(a), int(b), None] for a, b in zip(v, ix, strict=True)])
        return tok

    def _append(self, r: Request, tok: int) -> None:
        r.output_ids.append(tok)
        if tok in r.stop_ids:
            r.finish = {"type": "stop", "matched": tok}
        elif r.stop_strs and self.tokenizer is not None:
            tail = self.tokenizer.decode(r.output_ids[-64:], skip_special_tokens=False)
            hit = next((s for s in r.stop_strs if s in tail), None)
            if hit is not None:
                r.finish, r.matched_str = {"type": "stop", "matched": hit}, hit
        if r.finish is None and len(r.output_ids) >= r.max_new_tokens:
            r.finish = {"type": "length", "length": r.max_new_tokens}
        if r.finish is None and len(r.input_ids) + len(r.output_ids) >= self.max_len:
            r.finish = {"type": "length", "length": len(r.output_ids)}
        if r.on_token is not None:
            r.on_token()

    @torch.no_grad()
    def prefill(self, reqs: List[Request]) -> Batch:
        """Prefill ``reqs`` and sample their first tokens (a retracted request resumes: its prompt
        plus what it generated is recomputed). With the prefix cache on, distinct sequences are
        computed first and repeats of one sequence (a GRPO group) then reuse its KV: a repeat that
        needs no prompt log-probs copies the row of its first occurrence (KV and last logits: the
        prompt is computed once, as SGLang does for a shared prefix), the others are prefilled
        again from the cached prefix."""
        if self.prefix_cache is None:
            return self._prefill(reqs, [(0, None)] * len(reqs))
        seqs = [tuple(r.input_ids + r.output_ids) for r in reqs]
        first, rest, row_of = [], [], {}
        for r, seq in zip(reqs, seqs, strict=True):
            if seq in row_of:
                rest.append((r, row_of[seq]))
            else:
                row_of[seq] = len(first)
                first.append(r)
        copies = [] if self.reference else [(r, i) for r, i in rest if not _wants_input_logprobs(r)]
        again = [r for r, _ in rest] if self.reference else [r for r, _ in rest if _wants_input_logprobs(r)]
        batch = self._prefill(first, [self._match(r) for r in first], copies)
        if again:
            batch = self.merge(batch, self._prefill(again, [self._match(r) for r in again]))
        return batch

    def _match(self, r: Request):
        seq = r.input_ids + r.output_ids
        limit = len(seq) - 1
        if r.return_logprob and r.logprob_start_len >= 0 and not r.output_ids:
            limit = min(limit, r.logprob_start_len)
        return self.prefix_cache.match(seq, limit, self.weights_epoch)

    def _prefill(self, reqs: List[Request], hits, copies=()) -> Batch:
        """One forward for rows of (cached prefix KV, new tokens): row i is laid out as
        [pad, cached L_i, pad, new S_i] with the padding masked, so every row ends at the last column.
        ``copies`` (request, row) are repeats of a row's sequence: they take that row's KV and last
        logits after the forward, and what the prefix cache then holds for them."""
        seqs = [r.input_ids + r.output_ids for r in reqs]
        cached = [n for n, _ in hits]
        news = [len(q) - n for q, n in zip(seqs, cached, strict=True)]
        P, S = max(cached), max(news)
        ids = torch.tensor([[0] * (S - s) + q[n:] for q, n, s in zip(seqs, cached, news, strict=True)])
        mask = torch.tensor([[0] * (P - n) + [1] * n + [0] * (S - s) + [1] * s
                             for n, s in zip(cached, news, strict=True)])
        pos = torch.tensor([[0] * (S - s) + list(range(n, n + s)) for n, s in zip(cached, news, strict=True)])
        cache = self._cache_cls()
        if P:
            cache = self._cache_cls(ddp_cache_data=self._stack_prefix(hits, P))
        want_input = any(_wants_input_logprobs(r) for r in reqs)
        logits = self._forward(ids, mask, pos, cache, all_logits=want_input)
        if want_input:
            self._input_logprobs(logits, reqs, cached, news, S)
        if self.prefix_cache is not None:
            self._insert_prefixes(cache, seqs, cached, news, P, S)
        last = logits[:, -1]
        if copies:
            idx = torch.tensor(list(range(len(reqs))) + [row for _, row in copies])
            cache.batch_select_indices(idx)
            mask, last = mask[idx], last[idx]
            reqs = list(reqs) + [r for r, _ in copies]
            seqs += [r.input_ids + r.output_ids for r, _ in copies]
            cached += [self._match(r)[0] for r, _ in copies]  # as a prefill from the cache would report
        toks = self._sample(last, reqs)
        for r, t, n in zip(reqs, toks, cached, strict=True):
            if not r.output_ids:
                r.cached_tokens = n
            if r.finish is not None:  # the sampler failed on this row: it leaves alone
                continue
            if r.max_new_tokens <= 0:  # prompt log-probs only
                r.logprobs.clear()
                r.top_logprobs.clear()
                r.finish = {"type": "length", "length": 0}
            else:
                self._append(r, t)
        return Batch(reqs, cache, mask, torch.tensor([len(q) for q in seqs]), torch.tensor(toks))

    def _insert_prefixes(self, cache, seqs, cached, news, P: int, S: int) -> None:
        """Each computed row's whole KV (cached part and new part, without padding) into the cache."""
        for i, (q, n, s) in enumerate(zip(seqs, cached, news, strict=True)):
            if q in self.prefix_cache:
                continue
            if n:
                kv = [(torch.cat([layer.keys[i:i + 1, :, P - n:P], layer.keys[i:i + 1, :, P + S - s:]], 2),
                       torch.cat([layer.values[i:i + 1, :, P - n:P], layer.values[i:i + 1, :, P + S - s:]], 2))
                      for layer in cache.layers]
            else:
                kv = [(layer.keys[i:i + 1, :, P + S - s:], layer.values[i:i + 1, :, P + S - s:])
                      for layer in cache.layers]
            self.prefix_cache.insert(q, kv, self.weights_epoch)

    def _stack_prefix(self, hits, P: int):
        """The cached KV of each row, left-padded with zeros to ``P`` positions, stacked per layer."""
        layers = next(kv for _, kv in hits if kv is not None)
        data = []
        for li, (k0, v0) in enumerate(layers):
            ks, vs = [], []
            for _n, kv in hits:
                k = kv[li][0] if kv is not None else k0[:, :, :0]
                v = kv[li][1] if kv is not None else v0[:, :, :0]
                pad = P - k.shape[2]
                ks.append(torch.cat([k.new_zeros(1, k.shape[1], pad, k.shape[3]), k], 2))
                vs.append(torch.cat([v.new_zeros(1, v.shape[1], pad, v.shape[3]), v], 2))
            data.append((torch.cat(ks), torch.cat(vs)))
        return data

    def _input_logprobs(self, logits, reqs, cached, news, S) -> None:
        for i, r in enumerate(reqs):
            if not (r.return_logprob and r.logprob_start_len >= 0) or r.output_ids:
                continue
            temp = r.temperature if r.temperature > GREEDY_EPS else 1.0
            lp = torch.log_softmax(logits[i, S - news[i]:] / temp, dim=-1)  # lp[j] predicts token cached+j+1
            n, total = cached[i], len(r.input_ids)
            start = min(r.logprob_start_len, total - 1)
            r.input_logprobs = [[None if j == 0 else float(lp[j - 1 - n, r.input_ids[j]]), r.input_ids[j], None]
                                for j in range(start, total)]

    @torch.no_grad()
    def decode(self, b: Batch) -> None:
        """Feed every row's pending token and sample the next one."""
        b.mask = torch.cat([b.mask, torch.ones(len(b), 1, dtype=b.mask.dtype)], dim=1)
        logits = self._forward(b.pending[:, None], b.mask, b.pos[:, None], b.cache)
        toks = self._sample(logits[:, -1], b.reqs)
        for r, t in zip(b.reqs, toks, strict=True):
            if r.finish is None:
                self._append(r, t)
        b.pos = b.pos + 1
        b.pending = torch.tensor(toks)

    def merge(self, a: Optional[Batch], b: Batch) -> Batch:
        """Concatenate two batches (the shorter KV cache is left-padded)."""
        if a is None or not len(a):
            return b
        sa, sb = a.mask.shape[1], b.mask.shape[1]
        width = max(sa, sb)

        def lpad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if not missing:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        data = [(torch.cat([lpad(la.keys, 2), lpad(lb.keys, 2)]), torch.cat([lpad(la.values, 2), lpad(lb.values, 2)]))
                for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)]
        return Batch(a.reqs + b.reqs, self._cache_cls(ddp_cache_data=data),
                     torch.cat([lpad(a.mask, 1), lpad(b.mask, 1)]),
                     torch.cat([a.pos, b.pos]), torch.cat([a.pending, b.pending]))

    def keep(self, b: Batch, rows: List[int]) -> Batch:
        """The batch restricted to ``rows``, with all-padding leading columns trimmed."""
        idx = torch.tensor(rows, dtype=torch.long)
        b.cache.batch_select_indices(idx)
        mask = b.mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
        if first:
            mask = mask[:, first:]
            for layer in b.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        return Batch([b.reqs[i] for i in rows], b.cache, mask, b.pos[idx], b.pending[idx])
