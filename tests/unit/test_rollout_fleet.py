"""Fleet logic against fake engine clients: balancing, failover, exhaustion, pause/update/continue."""

import asyncio
import dataclasses

import pytest

from rollout.engines.protocol import EngineHTTPError, EngineUnavailable, GenerateOutput
from rollout.fleet import Fleet, FleetExhausted, WeightUpdateError
from tests.polling import async_until


class FakeEngine:
    """Duck-typed EngineClient: answers after ``delay`` (or, with ``hold`` set to an asyncio.Event,
    when the test sets it); can die or abort."""

    def __init__(self, url, delay=0.01, dead=False):
        self.url, self.delay, self.dead = url, delay, dead
        self.served, self.in_flight, self.max_in_flight = 0, 0, 0
        self.version, self.calls, self.abort_next = "0", [], 0
        self.fail_update = False
        self.http_error = None
        self.hold = None

    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        if self.http_error:
            raise EngineHTTPError(self.url, self.http_error, "scripted")
        if self.dead:
            raise EngineUnavailable(self.url, "connection refused")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            else:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.dead:
            raise EngineUnavailable(self.url, "server disconnected")
        self.served += 1
        if self.abort_next:
            self.abort_next -= 1
            return GenerateOutput(self.url, [1], [-0.5], "abort", {"type": "abort"}, self.version)
        return GenerateOutput(self.url, [1, 2], [-0.5, -0.25], "length", {"type": "length"}, self.version)

    async def health(self, timeout_s=5.0):
        return not self.dead

    async def pause_generation(self, mode="abort"):
        self.calls.append(("pause", mode))

    async def continue_generation(self):
        self.calls.append(("continue",))

    async def update_weights_from_disk(self, path, *, weight_version=None, flush_cache=True, **kw):
        self.calls.append(("update", path, weight_version) + (() if flush_cache else ("no-flush",)))
        if self.fail_update:
            raise RuntimeError("disk full")
        self.version = weight_version

    async def update_weight_version(self, version, **kw):
        self.version = version

    async def flush_cache(self):
        """SGLang refuses a flush (400) while a request runs."""
        self.calls.append(("flush", self.in_flight))
        if self.in_flight:
            raise EngineHTTPError(self.url, 400, "Flush cache failed.")

    async def weight_version(self):
        return self.version

    async def close(self):
        pass


def run(coro):
    return asyncio.run(coro)


def test_least_outstanding_balancing():
    fast, slow = FakeEngine("http://fast", delay=0.01), FakeEngine("http://slow", delay=0.2)

    async def main():
        fleet = Fleet([fast, slow], max_concurrent=4)  # a steady stream of 4 requests in flight
        await asyncio.gather(*(fleet.generate([1], {}) for _ in range(40)))
        return fleet.stats()

    stats = run(main())
    assert fast.served + slow.served == 40
    assert fast.served >= 4 * slow.served  # the engine with requests outstanding is avoided
    assert stats["http://fast"]["outstanding"] == 0 and stats["http://slow"]["outstanding"] == 0


def test_even_spread_when_equal():
    engines = [FakeEngine(f"http://e{i}", delay=0.05) for i in range(3)]

    async def main():
        fleet = Fleet(engines)
        await asyncio.gather(*(fleet.generate([1], {}) for _ in range(30)))

    run(main())
    assert [e.served for e in engines] == [10, 10, 10]
    assert all(e.max_in_flight == 10 for e in engines)


def test_engine_dying_mid_generation_is_dropped_and_requests_reissued():
    a, b = FakeEngine("http://a"), FakeEngine("http://b", delay=0.02)

    async def main():
        a.hold = asyncio.Event()  # `a` answers nothing until it dies
        fleet = Fleet([a, b])
        tasks = [asyncio.ensure_future(fleet.generate([1], {})) for _ in range(20)]
        held = await async_until(lambda: a.in_flight, "requests in flight on engine a")
        a.dead = True  # requests in flight on `a` fail now
        a.hold.set()
        outs = await asyncio.gather(*tasks)
        return fleet, outs, held

    fleet, outs, held = run(main())
    assert held > 0 and len(outs) == 20 and all(o.finish_reason == "length" and o.output_ids == [1, 2] for o in outs)
    assert all(o.engine == "http://b" for o in outs)
    assert fleet.live_urls == ["http://b"] and fleet.stats()["http://a"]["alive"] is False


def test_no_engine_left_is_a_clear_error():
    engines = [FakeEngine("http://a", dead=True), FakeEngine("http://b", dead=True)]

    async def main():
        await Fleet(engines).generate([1], {})

    with pytest.raises(FleetExhausted) as err:
        run(main())
    assert "no live rollout engine" in str(err.value) and "http://a" in str(err.value) and "http://b" in str(err.value)


def test_health_check_revives_a_restarted_engine():
    a, b = FakeEngine("http://a"), FakeEngine("http://b", dead=True)

    async def main():
        fleet = Fleet([a, b])
        first = await fleet.check_health()
        b.dead = False
        return first, await fleet.check_health()

    first, second = run(main())
    assert first == {"http://a": True, "http://b": False} and second == {"http://a": True, "http://b": True}


def test_aborted_requests_are_reissued():
    e = FakeEngine("http://a")
    e.abort_next = 2

    async def main():
        return await Fleet([e]).generate([1], {})

    out = run(main())
    assert out.finish_reason == "length" and e.served == 3


def test_update_pauses_updates_verifies_continues_and_holds_new_requests():
    engines = [FakeEngine("http://a", delay=0.05), FakeEngine("http://b", delay=0.05)]

    async def main():
        fleet = Fleet(engines)
        update = asyncio.ensure_future(fleet.update_weights_from_disk("/ckpt/3", "3", pause_mode="retract"))
        await asyncio.sleep(0)  # the update has paused the fleet
        out = await fleet.generate([1], {})  # waits for continue, then runs on new weights
        await update
        return out, await fleet.weight_versions()

    out, versions = run(main())
    assert out.weight_version == "3" and versions == {"http://a": "3", "http://b": "3"}
    for e in engines:
        assert e.calls == [("pause", "retract"), ("update", "/ckpt/3", "3"), ("continue",), ("flush", 0)]


def test_in_place_update_flushes_after_the_paused_requests_finish():
    """in_place: the running request keeps going (SGLang keeps its KV), the update does not ask for a
    flush SGLang would refuse, and new requests wait until the engine has flushed."""
    eng = FakeEngine("http://a", delay=0.3)

    async def main():
        fleet = Fleet([eng])
        running = asyncio.ensure_future(fleet.generate([1], {}))
        await async_until(lambda: eng.in_flight, "the request to start")
        await fleet.update_weights_from_disk("/ckpt/5", "5", pause_mode="in_place")
        assert running.done()  # the update returned only after the flush, i.e. after it finished
        return await fleet.generate([1], {})

    out = run(main())
    assert out.weight_version == "5"
    assert eng.calls[:3] == [("pause", "in_place"), ("update", "/ckpt/5", "5", "no-flush"), ("continue",)]
    flushes = [c for c in eng.calls if c[0] == "flush"]
    assert flushes[0] == ("flush", 1) and flushes[-1] == ("flush", 0)  # refused while running, then done


def test_failed_update_raises_after_continuing():
    a, b = FakeEngine("http://a"), FakeEngine("http://b")
    b.fail_update = True

    async def main():
        fleet = Fleet([a, b])
        with pytest.raises(WeightUpdateError) as err:
            await fleet.update_weights_from_disk("/ckpt/4", "4")
        out = await fleet.generate([1], {})  # the fleet is running again
        return err.value, out

    err, out = run(main())
    assert set(err.errors) == {"http://b"} and "disk full" in str(err)
    assert ("continue",) in b.calls and out.output_ids == [1, 2]


def test_server_errors_fail_over_but_request_errors_propagate():
    a, b = FakeEngine("http://a"), FakeEngine("http://b")
    a.http_error = 500

    async def main():
        fleet = Fleet([a, b])
        outs = [await fleet.generate([1], {}) for _ in range(8)]
        live = fleet.live_urls
        b.http_error = 400
        with pytest.raises(EngineHTTPError, match="400"):
            await fleet.generate([1], {})
        return outs, live

    outs, live = run(main())
    assert all(o.engine == "http://b" for o in outs)
    assert live == ["http://b"]  # `a` answers /health but failed 3 requests in a row: dropped


class LateAnswerEngine(FakeEngine):
    """Answers with the version it held when the request started (a response produced before an
    update but delivered after it, as asynchronous rollout can see)."""

    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        version = self.version
        out = await super().generate(input_ids, params, rid=rid, return_logprob=return_logprob)
        return dataclasses.replace(out, weight_version=version)


def test_a_response_from_the_version_it_was_issued_at_is_kept_across_an_update():
    eng = LateAnswerEngine("http://late", delay=0.2)

    async def main():
        fleet = Fleet([eng])
        await fleet.update_weights_from_disk("/v1", "1")
        pending = asyncio.ensure_future(fleet.generate([1], {}))
        await async_until(lambda: eng.in_flight, "the request to start")
        await fleet.update_weights_from_disk("/v2", "2", pause_mode="in_place")  # lands mid-request
        out = await pending
        return fleet, out

    fleet, out = run(main())
    assert out.weight_version == "1" and fleet.live_urls == ["http://late"]
    eng.version = "7"  # changed behind the fleet's back: still dropped

    async def rogue():
        return await asyncio.gather(fleet.generate([1], {}), return_exceptions=True)

    run(rogue())
    assert fleet.live_urls == []


def test_sticky_handles_keep_every_turn_on_one_engine_and_fail_over():
    engines = [FakeEngine(f"e{i}") for i in range(3)]

    async def main():
        fleet = Fleet(engines)
        handles = [fleet.sticky(f"s{k}") for k in range(6)]

        async def sample(h):
            served = []
            for _ in range(4):  # four turns, interleaved with the other samples
                served.append((await h.generate([1], {})).engine)
            return served

        paths = await asyncio.gather(*(sample(h) for h in handles))
        assert all(len(set(p)) == 1 for p in paths)  # least-loaded would spread a sample's turns
        assert sorted(p[0] for p in paths) == ["e0", "e0", "e1", "e1", "e2", "e2"]  # first turns balanced
        first = handles[0]
        home = paths[0][0]
        next(e for e in engines if e.url == home).dead = True
        other = (await first.generate([1], {})).engine
        assert other != home and (await first.generate([1], {})).engine == other  # re-homed, sticky again
        first.release()
        assert "s0" not in fleet._sticky and len(fleet._sticky) == 5

    asyncio.run(main())
