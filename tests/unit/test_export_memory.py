"""Memory of the bus export (issue 21, item 11), measured on CPU with a dispatch-mode tracker:
rebuilding a TP-gathered parameter holds at most 2x the full parameter (the gather buffer and one
copy; 1x for dim-0 shards), FP8 quantization at most 2x its bf16 input, and the tied output layer
is not gathered at all (HF reads the embedding)."""

import types

import pytest
import torch

from megatron_alp.model.sharding import unshard, unshard_gathered
from rollout.bus.fp8 import quantize_named
from rollout.engines.local.fp8 import quantize_weight_blockwise

from ._memtrack import peak_bytes


def _meta(dim, stride):
    return types.SimpleNamespace(partition_dim=dim, partition_stride=stride)


def _gathered(shards):
    """What gather_full's all-gather leaves: one [tp, *shard] buffer, allocated inside the measurement."""
    buf = torch.empty((len(shards), *shards[0].shape), dtype=shards[0].dtype)
    for i, s in enumerate(shards):
        buf[i].copy_(s)
    return buf


@pytest.mark.parametrize("dim,stride", [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3)])
def test_unshard_holds_at_most_two_copies(dim, stride):
    tp, g = 4, torch.Generator().manual_seed(dim * 10 + stride)
    shape = [24, 36]
    shape[dim] = 6 * stride
    shards = [torch.randn(*shape, generator=g) for _ in range(tp)]
    full_bytes = sum(s.numel() for s in shards) * 4
    ref = unshard(shards, _meta(dim, stride))
    out, peak = peak_bytes(lambda: unshard_gathered(_gathered(shards), _meta(dim, stride)))
    assert torch.equal(out, ref)
    assert peak <= (1 if (dim, stride) == (0, 1) else 2) * full_bytes, peak / full_bytes
    _, old = peak_bytes(lambda: unshard([s.clone() for s in shards], _meta(dim, stride)))
    assert stride == 1 or old > 2 * full_bytes  # the list-and-cat rebuild this replaces: 3x


def test_fp8_export_holds_at_most_twice_its_bf16_input():
    # Not block multiples; the band temporaries are a 128-row slice: small next to a real weight.
    w = torch.randn(3000, 500, generator=torch.Generator().manual_seed(0)).bfloat16()
    name = "model.layers.0.mlp.down_proj.weight"
    (q, s), peak = peak_bytes(lambda: [t for _, t in quantize_named([(name, w)])])
    ref_q, ref_s = quantize_weight_blockwise(w)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s.float())
    assert peak <= 2 * w.numel() * w.element_size(), peak / (w.numel() * 2)
    _, whole = peak_bytes(lambda: quantize_weight_blockwise(w))
    assert whole > 4 * w.numel() * w.element_size()  # the one-shot quantizer this replaces: ~6x


def test_tied_output_layer_is_not_gathered(monkeypatch):
    from megatron_alp.convert import hf_export as export

    emb, out = torch.randn(8, 4), torch.randn(8, 4)
    gathered = []
    monkeypatch.setattr(export, "export_role", lambda: (True, True))
    monkeypatch.setattr(export, "named_global_parameters",
                        lambda m: [("embedding.word_embeddings.weight", emb), ("output_layer.weight", out)])
    monkeypatch.setattr(export, "gather_full_many", lambda batch, v: [gathered.append(n) or p for n, p in batch])
    for tied in (True, False):
        gathered.clear()
        wm = types.SimpleNamespace(model=types.SimpleNamespace(tie_embeddings=tied),
                                   megatron_to_hf=lambda n, full, p, tied=tied: (
                                       [] if tied and n.startswith("output") else [(n, full)]))
        names = [n for n, _ in export.iter_hf_tensors([object()], wm, 8)]
        assert gathered == names == (["embedding.word_embeddings.weight"] if tied else
                                     ["embedding.word_embeddings.weight", "output_layer.weight"])
