"""runtime.buckets: the one byte-bounded grouping behind the bus's send buckets and the export's
batched TP all-gathers."""

import torch

from megatron_alp.runtime.buckets import buckets


def _named(*specs):
    return [(f"t{i}", torch.zeros(n, dtype=dtype)) for i, (n, dtype) in enumerate(specs)]


def _names(groups):
    return [[name for name, _ in g] for g in groups]


def test_buckets_bound_bytes_keep_order_and_put_a_big_tensor_alone():
    named = _named((4, torch.float32), (4, torch.float32), (4, torch.float32), (20, torch.float32),
                   (2, torch.float32))
    groups = list(buckets(named, bucket_bytes=32))
    assert _names(groups) == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [name for g in groups for name, _ in g] == [name for name, _ in named]
    for g in groups:
        assert len(g) == 1 or sum(t.numel() * t.element_size() for _, t in g) <= 32
    assert list(buckets([], 32)) == []


def test_one_dtype_also_splits_where_the_dtype_changes():
    named = _named((2, torch.float32), (2, torch.bfloat16), (2, torch.bfloat16), (2, torch.float32))
    assert _names(buckets(named, bucket_bytes=1 << 20)) == [["t0", "t1", "t2", "t3"]]
    split = list(buckets(named, bucket_bytes=1 << 20, one_dtype=True))
    assert _names(split) == [["t0"], ["t1", "t2"], ["t3"]]
    assert all(len({t.dtype for _, t in g}) == 1 for g in split)
