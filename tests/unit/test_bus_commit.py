"""The all-or-nothing commit against scripted engines: retries, drop/stop, rejection, spot checks."""

import asyncio

import pytest

from rollout.bus.commit import CommitError, SpotCheck, commit, disk_apply, session_apply
from rollout.engines.protocol import GenerateOutput
from rollout.fleet import Fleet


class Engine:
    """Duck-typed EngineClient; ``fail`` = how many update calls fail before one succeeds."""

    def __init__(self, url, fail=0, logprobs=(-1.0, -2.0)):
        self.url, self.fail, self.version, self.paused = url, fail, "0", False
        self.calls, self.lps = [], list(logprobs)

    async def update_weights_from_disk(self, path, *, weight_version=None, **kw):
        self.calls.append(("update", weight_version))
        if self.fail:
            self.fail -= 1
            raise RuntimeError("checksum mismatch in tensor 'w'")
        self.version = weight_version

    async def end_weight_update(self):
        self.calls.append(("end",))

    async def update_weight_version(self, v, **kw):
        self.version = v

    async def flush_cache(self):
        self.calls.append(("flush",))

    async def weight_version(self):
        return self.version

    async def prompt_logprobs(self, ids, start):
        return self.lps

    async def pause_generation(self, mode="abort"):
        self.paused = True
        self.calls.append(("pause",))

    async def continue_generation(self):
        self.paused = False
        self.calls.append(("continue",))

    async def generate(self, ids, params, *, rid=None, return_logprob=True):
        return GenerateOutput(self.url, [1], [-0.5], "length", {"type": "length"}, self.version)

    async def health(self, timeout_s=5.0):
        return True

    async def close(self):
        pass


def run(coro):
    return asyncio.run(coro)


def test_a_retried_engine_commits_and_the_fleet_continues():
    a, b = Engine("http://a"), Engine("http://b", fail=1)

    async def main():
        fleet = Fleet([a, b])
        rep = await commit(fleet, 3, disk_apply("/bus/v3", 3), retries=1, backoff_s=0)
        return fleet, rep

    fleet, rep = run(main())
    assert sorted(rep.committed) == ["http://a", "http://b"] and rep.attempts["http://b"] == 2
    assert fleet.committed_version == "3" and not a.paused and not b.paused
    assert rep.metrics()["bus/apply_retries"] == 1


def test_one_of_two_failing_ends_on_one_version_never_two():
    a, b = Engine("http://a"), Engine("http://b", fail=99)

    async def main():
        fleet = Fleet([a, b])
        rep = await commit(fleet, 4, disk_apply("/bus/v4", 4), retries=2, backoff_s=0)
        outs = [await fleet.generate([1], {}) for _ in range(6)]
        return fleet, rep, outs

    fleet, rep, outs = run(main())
    assert rep.committed == ["http://a"] and "checksum mismatch" in rep.dropped["http://b"]
    assert b.calls.count(("update", "4")) == 3  # tried, retried twice, then dropped
    assert fleet.live_urls == ["http://a"] and fleet.committed_version == "4"
    assert {o.weight_version for o in outs} == {"4"} and {o.engine for o in outs} == {"http://a"}
    assert b.paused  # the dropped engine is left paused: it serves nothing on version 0
    assert "could not take weight version 4" in fleet.stats()["http://b"]["dropped"]

    async def health_again():
        return await fleet.check_health()

    assert run(health_again())["http://b"] is False  # a dropped engine never rejoins by itself


def test_stop_policy_raises_and_leaves_the_fleet_paused():
    a, b = Engine("http://a"), Engine("http://b", fail=99)

    async def main():
        fleet = Fleet([a, b])
        with pytest.raises(CommitError, match="on_engine_failure = stop") as err:
            await commit(fleet, 5, disk_apply("/bus/v5", 5), retries=0, on_failure="stop")
        return fleet, err.value

    fleet, err = run(main())
    assert set(err.errors) == {"http://b"} and "http://b" in str(err)
    assert a.paused and b.paused and fleet.committed_version is None


def test_no_engine_takes_it_the_version_is_rejected_and_the_old_one_stays():
    a, b = Engine("http://a", fail=99), Engine("http://b", fail=99)

    async def main():
        fleet = Fleet([a, b])
        a.version = b.version = fleet.committed_version = "2"
        with pytest.raises(CommitError, match="rejected"):
            await commit(fleet, 3, disk_apply("/bus/v3", 3), retries=0)
        out = await fleet.generate([1], {})
        return fleet, out

    fleet, out = run(main())
    assert fleet.committed_version == "2" and sorted(fleet.live_urls) == ["http://a", "http://b"]
    assert not a.paused and not b.paused and out.weight_version == "2"


def test_spot_check_reports_per_engine_and_a_tolerance_drops_the_outlier():
    a, b = Engine("http://a", logprobs=(-1.0, -2.0)), Engine("http://b", logprobs=(-1.0, -2.5))
    spot = SpotCheck(input_ids=[1, 2, 3, 4], start=2, expected=[-1.0, -2.01], tol=0.1)

    async def main():
        fleet = Fleet([a, b])
        return await commit(fleet, 6, disk_apply("/bus/v6", 6), retries=0, spot_check=spot)

    rep = run(main())
    assert rep.spot_max_abs_diff["http://a"] == pytest.approx(0.01)
    assert rep.spot_max_abs_diff["http://b"] == pytest.approx(0.49)
    assert rep.committed == ["http://a"] and "spot check" in rep.dropped["http://b"]


def test_session_commit_after_a_transfer_that_failed_on_one_engine():
    a, b = Engine("http://a"), Engine("http://b")

    async def main():
        fleet = Fleet([a, b])
        await fleet.pause()
        return fleet, await commit(fleet, 7, session_apply(7), already_paused=True,
                                   failed={"http://b": "broadcast failed"})

    fleet, rep = run(main())
    assert rep.committed == ["http://a"] and rep.dropped == {"http://b": "broadcast failed"}
    assert ("end",) in a.calls and ("end",) not in b.calls and a.version == "7" and b.version == "0"


def test_an_engine_answering_with_another_version_is_dropped():
    a, b = Engine("http://a"), Engine("http://b")

    async def main():
        fleet = Fleet([a, b])
        await commit(fleet, 8, disk_apply("/bus/v8", 8))
        b.version = "5"  # someone reloaded b behind the fleet's back
        outs = [await fleet.generate([1], {}) for _ in range(4)]
        return fleet, outs

    fleet, outs = run(main())
    assert {o.weight_version for o in outs} == {"8"} and fleet.live_urls == ["http://a"]
