"""Fault tolerance: one of two local engines is killed mid-batch; every sample still comes back."""

import asyncio

import pytest

from rollout.config import ClientConfig, LocalEngineConfig, RolloutConfig
from rollout.engines.protocol import sampling_params
from rollout.engines.start import make_fleet, start_engines
from rollout.fleet import FleetExhausted
from rollout.tiny_model import make_tiny_model

# 400 tokens: every request decodes for far longer than the 0.05 s poll after which the victim is killed (the
# test asserts none had finished); the survivor then decodes its own and the victim's requests to the end.
N_REQUESTS, N_TOKENS = 16, 400


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = make_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=3, max_position_embeddings=500)
    cfg = RolloutConfig(engine="local", precision="fp32", num_engines=2, base_port=0, model_path=model,
                        startup_timeout_s=180, local=LocalEngineConfig(max_batch_size=8, batch_wait_ms=10),
                        client=ClientConfig(max_retries=1, retry_backoff_s=0.05, request_timeout_s=300))
    launched = start_engines(cfg, log_dir=str(tmp_path_factory.mktemp("logs")))
    try:
        yield cfg, launched
    finally:
        launched.stop()


def test_engine_killed_mid_batch_every_sample_returns(engines):
    cfg, launched = engines
    victim, survivor = launched.servers

    async def main():
        async with make_fleet(cfg, launched) as fleet:
            params = sampling_params(max_new_tokens=N_TOKENS, ignore_eos=True)
            tasks = [asyncio.ensure_future(fleet.generate([5, 6, 7 + i % 4], params)) for i in range(N_REQUESTS)]
            # wait until the victim is decoding its share, then kill it (SIGKILL, no goodbye)
            for _ in range(600):
                stats = fleet.stats()
                if all(s["outstanding"] > 0 for s in stats.values()):
                    break
                await asyncio.sleep(0.05)
            assert fleet.stats()[victim.url]["outstanding"] > 0
            assert not any(t.done() for t in tasks)
            victim.kill()
            outs = await asyncio.gather(*tasks)
            after = fleet.stats()
            with pytest.raises(FleetExhausted, match="no live rollout engine"):
                survivor.kill()
                await fleet.generate([1], sampling_params(max_new_tokens=2))
            return outs, after

    outs, stats = asyncio.run(main())
    assert len(outs) == N_REQUESTS
    for o in outs:  # complete samples only: nothing partial leaks from the dead engine
        assert o.finish_reason == "length" and len(o.output_ids) == N_TOKENS == len(o.logprobs)
        assert o.engine == survivor.url
    assert stats[victim.url]["alive"] is False and stats[survivor.url]["alive"] is True
    assert stats[survivor.url]["served"] == N_REQUESTS  # the victim's requests were re-issued
