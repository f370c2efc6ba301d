"""The local engine's batched paths against its plain reference paths (LocalModel(reference=True)):
rows sampled together, repeats of a prompt copied instead of prefilled again, the FP8 activation
fake-quant with fewer ops and shared between linears fed the same input."""

import threading

import pytest
import torch

from rollout.engines.local.fp8 import fake_quant_activation, fake_quant_activation_fast
from rollout.engines.local.runner import LocalModel, Request
from rollout.engines.local.scheduler import Scheduler
from rollout.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=64, num_layers=2, init_std=0.3, seed=3)


def _group_requests(vocab, groups=6, n=5, seed=0, **kw):
    """``groups`` prompts x ``n`` samples, each with its own seeded generator; a mix of sampling
    options so that batched (unfiltered) rows and row-by-row (filtered, greedy, unseeded) rows meet."""
    g = torch.Generator().manual_seed(seed)
    options = [{}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 0.0}, {"min_p": 0.1}, {"temperature": 0.7}]
    reqs = []
    for p in range(groups):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        for i in range(n):
            opt = options[(p + i) % len(options)] if kw.get("mixed") else {}
            unseeded = kw.get("mixed") and i == n - 1
            reqs.append(Request(rid=f"{p}-{i}", input_ids=list(prompt), max_new_tokens=6, return_logprob=True,
                                top_logprobs_num=2 if i == 0 else 0,
                                generator=None if unseeded else torch.Generator().manual_seed(1000 * p + i),
                                **opt))
    return reqs


def _run(model, reqs, max_batch):
    sched = Scheduler(model, max_batch_size=max_batch, batch_wait_s=0.0)
    done, ev = [], threading.Event()

    def cb(r):
        done.append(r)
        if len(done) == len(reqs):
            ev.set()

    sched.pause("in_place")  # every request queued before the worker admits any: one composition
    try:
        for r in reqs:
            sched.submit(r, cb)
        sched.resume()
        assert ev.wait(120), "requests did not finish"
    finally:
        sched.close()
    return {r.rid: r for r in reqs}


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
@pytest.mark.parametrize("mixed", [False, True])
def test_batched_paths_give_the_reference_samples(model_dir, precision, mixed):
    fast = LocalModel(model_dir, precision=precision, seed=5)
    ref = LocalModel(model_dir, precision=precision, seed=5, reference=True)
    a = _run(fast, _group_requests(fast.vocab_size, mixed=mixed), max_batch=32)
    b = _run(ref, _group_requests(ref.vocab_size, mixed=mixed), max_batch=32)
    tol = 1e-5 if precision == "fp32" else 2e-2  # a repeat's last position: computed in another batch layout
    for rid, r in b.items():
        x = a[rid]
        assert x.output_ids == r.output_ids, rid
        assert x.finish == r.finish and x.cached_tokens == r.cached_tokens, rid
        assert x.logprobs == pytest.approx(r.logprobs, abs=tol), rid
        assert [[t for _, t, _ in row] for row in x.top_logprobs] == [[t for _, t, _ in row] for row in r.top_logprobs]
    # the repeats of each prompt were served from the first one's row: one prefill forward, not two
    assert fast.prefix_cache.stats["hits"] == ref.prefix_cache.stats["hits"] > 0


def test_batched_sampling_equals_multinomial_row_by_row():
    """torch.multinomial(p, 1, generator=g) per row vs the batched draw, for the same generators."""
    lm = LocalModel.__new__(LocalModel)  # only the sampler: no model needed
    lm.reference, lm.generator = False, torch.Generator().manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        logits = torch.randn(16, 37, generator=g) * (1 + trial % 4)
        logits[3, 5] = 30.0  # a near-certain row
        reqs = [Request(rid=str(i), input_ids=[1], max_new_tokens=1, temperature=0.5 + 0.1 * (i % 5),
                        return_logprob=True, generator=torch.Generator().manual_seed(100 * trial + i))
                for i in range(16)]
        temps = torch.tensor([r.temperature for r in reqs])
        logp = torch.log_softmax(logits / temps[:, None], -1)
        want = [int(torch.multinomial(logp[i].exp(), 1, generator=torch.Generator().manual_seed(100 * trial + i)))
                for i in range(16)]
        got = lm._sample(logits, reqs)
        assert got == want
        assert [r.logprobs[0] for r in reqs] == [float(logp[i, t]) for i, t in enumerate(want)]
        # each generator advanced exactly as by its multinomial draw
        after = [torch.rand(1, generator=r.generator).item() for r in reqs]
        ref_gens = [torch.Generator().manual_seed(100 * trial + i) for i in range(16)]
        for i, rg in enumerate(ref_gens):
            torch.multinomial(logp[i].exp(), 1, generator=rg)
        assert after == [torch.rand(1, generator=rg).item() for rg in ref_gens]


def test_a_bad_row_fails_alone_in_the_batched_sampler():
    lm = LocalModel.__new__(LocalModel)
    lm.reference, lm.generator = False, torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11)
    logits[2] = float("nan")
    reqs = [Request(rid=str(i), input_ids=[1], max_new_tokens=1, return_logprob=True,
                    generator=torch.Generator().manual_seed(i)) for i in range(4)]
    toks = lm._sample(logits, reqs)
    assert reqs[2].finish["type"] == "abort" and "sampling failed" in reqs[2].finish["message"]
    assert all(reqs[i].finish is None and len(reqs[i].logprobs) == 1 for i in (0, 1, 3))
    logp = torch.log_softmax(logits[[0, 1, 3]], -1)
    assert [toks[i] for i in (0, 1, 3)] == [
        int(torch.multinomial(logp[j].exp(), 1, generator=torch.Generator().manual_seed(i)))
        for j, i in enumerate((0, 1, 3))]


@pytest.mark.parametrize("k", [24, 64, 128, 256, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_activation_fake_quant_is_bitwise_the_reference(k, dtype):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(3, 5, k, generator=g) * torch.logspace(-6, 3, k)).to(dtype)
    x[0, 0] = 0  # an all-zero token
    x[1, 2, :7] = 1e-30  # tiny values next to the clamp
    before = x.clone()
    got, want = fake_quant_activation_fast(x), fake_quant_activation(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(x, before)  # the input is left alone


def test_shared_activation_quant_is_recomputed_for_a_changed_input(model_dir):
    lm = LocalModel(model_dir, precision="fp8", seed=0)
    hook = lm.model._fp8_activation_quant
    x = torch.randn(2, 3, 64).bfloat16()
    first = hook(None, (x,))[0]
    assert hook(None, (x,))[0] is first  # q/k/v fed the same tensor: quantized once
    x.mul_(2)  # an in-place change bumps the version counter
    assert torch.equal(hook(None, (x,))[0], fake_quant_activation(x))
    y = x.clone()
    assert hook(None, (y,))[0] is not first
