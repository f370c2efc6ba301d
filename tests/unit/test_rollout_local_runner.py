"""The local engine's model runner and scheduler in-process: continuous batching is exact."""

import threading

import pytest
import torch

from rollout.engines.local.runner import LocalModel, Request
from rollout.engines.local.scheduler import Scheduler
from rollout.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a larger init than a real model's so that greedy choices are well separated
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), init_std=0.3, seed=1)


@pytest.fixture(scope="module")
def lm(model_dir):
    return LocalModel(model_dir, precision="fp32", seed=0)


def reference(model, prompt, n, temperature=1.0):
    """Greedy continuation and log_softmax(logits/T) at each chosen token, full forward per step."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(torch.argmax(logits))
            lps.append(float(torch.log_softmax(logits / temperature, -1)[tok]))
            ids.append(tok)
    return ids[len(prompt):], lps


def run_all(sched, reqs):
    done, ev = [], threading.Event()

    def cb(r):
        done.append(r)
        if len(done) == len(reqs):
            ev.set()

    for r in reqs:
        sched.submit(r, cb)
    assert ev.wait(120), "requests did not finish"
    return done


def test_continuous_batching_matches_one_at_a_time(lm):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, lm.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 12, (10,), generator=g)]
    lengths = [3, 9, 5, 12, 4, 7, 10, 2, 6, 8]
    reqs = [Request(rid=str(i), input_ids=p, max_new_tokens=n, temperature=0.0, return_logprob=True)
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    sched = Scheduler(lm, max_batch_size=4, batch_wait_s=0.0)
    try:
        run_all(sched, reqs)
    finally:
        sched.close()
    for r, p, n in zip(reqs, prompts, lengths, strict=True):
        ids, lps = reference(lm.model, p, n)
        assert r.output_ids == ids, f"request {r.rid}"
        assert r.logprobs == pytest.approx(lps, abs=1e-4)
        assert r.finish == {"type": "length", "length": n}
    assert 2 <= sched.stats["max_batch_seen"] <= 4
    assert sched.stats["prefills"] < len(reqs)  # requests joined running batches


def test_sampling_logprobs_are_full_distribution_at_temperature(lm):
    prompt = [5, 9, 14, 20]
    r = Request(rid="t", input_ids=prompt, max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.8,
                return_logprob=True, generator=torch.Generator().manual_seed(3))
    b = lm.prefill([r])
    while r.finish is None:
        lm.decode(b)
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + r.output_ids])).logits[0].float()
    ref = torch.log_softmax(logits / 0.7, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(r.output_ids)[:, None])[:, 0]
    assert r.logprobs == pytest.approx(ref.tolist(), abs=1e-4)
    # each sampled token is inside the top-5 (the filter applies to sampling only)
    top5 = torch.topk(logits[len(prompt) - 1:-1], 5, dim=-1).indices
    assert all(t in row for t, row in zip(r.output_ids, top5.tolist(), strict=True))


def test_stop_tokens_and_eos(lm):
    first, _ = reference(lm.model, [7, 8, 9], 4)
    r = Request(rid="s", input_ids=[7, 8, 9], max_new_tokens=10, temperature=0.0, stop_ids={first[2]})
    b = lm.prefill([r])
    while r.finish is None:
        lm.decode(b)
    assert r.output_ids == first[: first.index(first[2]) + 1]
    assert r.finish == {"type": "stop", "matched": first[2]}


def test_abort_and_pause(lm):
    sched = Scheduler(lm, max_batch_size=4, batch_wait_s=0.0)
    try:
        done, ev = [], threading.Event()
        long = Request(rid="long", input_ids=[3, 4], max_new_tokens=400, temperature=1.0)
        sched.submit(long, lambda r: (done.append(r), ev.set()))
        sched.pause("in_place")
        n = len(long.output_ids)
        threading.Event().wait(0.2)
        assert len(long.output_ids) == n and not done  # no progress while paused
        sched.resume()
        sched.abort("long")
        assert ev.wait(30)
        assert long.finish["type"] == "abort" and len(long.output_ids) < 400
        # pause(abort) aborts what runs and holds new requests until resume
        ev.clear()
        r2 = Request(rid="r2", input_ids=[3], max_new_tokens=400, temperature=1.0)
        sched.submit(r2, lambda r: ev.set())
        sched.pause("abort")
        assert ev.wait(30) and r2.finish["type"] == "abort"
        ev.clear()
        r3 = Request(rid="r3", input_ids=[3], max_new_tokens=2, temperature=1.0)
        sched.submit(r3, lambda r: ev.set())
        assert not ev.wait(0.3)
        sched.resume()
        assert ev.wait(30) and r3.finish["type"] == "length"
    finally:
        sched.close()


def test_weight_loading(lm, tmp_path):
    from safetensors.torch import save_file

    name = "model.layers.0.mlp.down_proj.weight"
    old = lm.model.state_dict()[name].clone()
    save_file({name: torch.full_like(old, 0.01)}, str(tmp_path / "part.safetensors"))
    try:
        assert lm.load_weights_from_dir(str(tmp_path)) == 1
        assert torch.all(lm.model.state_dict()[name] == 0.01)
        save_file({"nope.weight": torch.zeros(2)}, str(tmp_path / "part.safetensors"))
        with pytest.raises(KeyError, match="not in the model"):
            lm.load_weights_from_dir(str(tmp_path))
        save_file({name: torch.zeros(3, 3)}, str(tmp_path / "part.safetensors"))
        with pytest.raises(ValueError, match="shape"):
            lm.load_weights_from_dir(str(tmp_path))
    finally:
        with torch.no_grad():
            lm.model.state_dict()[name].copy_(old)


def test_low_precision_mismatch_fp8_above_bf16(model_dir, lm):
    prompt = torch.tensor([[5, 9, 14, 20, 30, 31]])
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(prompt).logits[0].float(), -1)
    kl = {}
    for precision in ("bf16", "fp8"):
        low = LocalModel(model_dir, precision=precision)
        with torch.no_grad():
            got = torch.log_softmax(low.model(prompt).logits[0].float(), -1)
        assert torch.isfinite(got).all()
        kl[precision] = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert 0 < kl["bf16"] < kl["fp8"] < 1.0, kl  # FP8 rounding is the larger mismatch
    assert len(low.fp8_names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    w = low.model.model.layers[0].mlp.up_proj.weight  # [128, 64]: one block
    assert w.numel() == 8192 and torch.unique(w).numel() <= 255  # at most the e4m3 codes of one scale
