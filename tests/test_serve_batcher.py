"""The dynamic batcher on its own (no HTTP, no model): planning, grouping, failure isolation,
shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")

from ultrafastbert.errors import ConfigError, InputError, ResourceError  # noqa: E402
from ultrafastbert.serve import Batcher, Job, ServeConfig, plan_batches  # noqa: E402
from ultrafastbert.serve.admission import size_limits  # noqa: E402
from ultrafastbert.serve.batcher import JobCancelled, Ticket  # noqa: E402
from ultrafastbert.serve.errors import ServeError  # noqa: E402


def job(key, length: int, payload=None) -> Job:
    return Job(key, [1] * length, payload)


def test_plan_batches_groups_keys_sorts_by_length_and_keeps_the_budget():
    jobs = [job("a", 5), job("b", 2), job("a", 1), job("a", 9), job("b", 3), job("a", 4)]
    batches = plan_batches(jobs, max_batch_tokens=12)
    shapes = [(b[0].key, [len(j.ids) for j in b]) for b in batches]
    assert shapes == [("a", [1, 4]), ("a", [5]), ("a", [9]), ("b", [2, 3])]
    for batch in batches:
        assert len(batch) * max(len(j.ids) for j in batch) <= 12
    assert sorted(map(id, jobs)) == sorted(id(j) for b in batches for j in b)
    assert [len(b) for b in plan_batches([job("a", 20)], 12)] == [1]  # too long: alone
    assert [len(b) for b in plan_batches([job("a", 3)] * 8, 12)] == [4, 4]


def test_plan_batches_cuts_where_padding_costs_more_than_a_call():
    jobs = [job("a", n) for n in (41, 10, 12, 40, 11, 70)]
    lengths = [[len(j.ids) for j in b] for b in plan_batches(jobs, 1000, overhead_tokens=8)]
    assert lengths == [[10, 11, 12], [40, 41], [70]]
    # Control: with a costly call everything shares one batch.
    assert len(plan_batches(jobs, 1000, overhead_tokens=1000)) == 1


class Recorder:
    """A runner that records its batches; ``payload == "bad"`` makes a batch raise."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[object]] = []
        self.delay = delay
        self.threads: set[str] = set()
        self.started = threading.Event()

    def __call__(self, key, jobs):
        self.started.set()
        self.threads.add(threading.current_thread().name)
        self.batches.append([j.payload for j in jobs])
        time.sleep(self.delay)
        if any(j.payload == "bad" for j in jobs):
            raise InputError("bad payload")
        return [f"{key}:{j.payload}" for j in jobs]


async def submit_all(batcher, items):
    futures = [f for key, payload in items for f in batcher.submit(key, [[1, 2]], [payload])]
    return await asyncio.gather(*futures, return_exceptions=True)


def test_concurrent_jobs_share_a_batch_and_get_their_own_result():
    runner, stats = Recorder(), []
    batcher = Batcher(runner, max_batch_tokens=100, max_wait_s=0.2, observer=stats.append)
    batcher.start()
    results = asyncio.run(submit_all(batcher, [("e", i) for i in range(6)]))
    batcher.close()
    assert results == [f"e:{i}" for i in range(6)]
    assert runner.batches == [[0, 1, 2, 3, 4, 5]]
    assert runner.threads == {"ultrafastbert-batcher-0"}
    assert [(s.jobs, s.padded_tokens, s.failed) for s in stats] == [(6, 12, False)]
    assert batcher.pending == 0


def test_a_batch_wakes_the_event_loop_once():
    runner = Recorder()
    batcher = Batcher(runner, max_batch_tokens=100, max_wait_s=0.2)
    batcher.start()
    wakeups = []

    async def main():
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counted(callback, *args):
            wakeups.append(callback)
            return plain(callback, *args)

        loop.call_soon_threadsafe = counted
        futures = batcher.submit("e", [[1, 2]] * 8, list(range(8)))
        return await asyncio.gather(*futures)

    assert asyncio.run(main()) == [f"e:{i}" for i in range(8)]
    batcher.close()
    assert runner.batches == [list(range(8))]
    assert len(wakeups) == 1  # eight results, one hand-over


def test_without_waiting_an_idle_model_takes_the_first_job_alone():
    runner = Recorder(delay=0.3)
    batcher = Batcher(runner, max_batch_tokens=100, max_wait_s=0.0)
    batcher.start()

    async def staggered():
        first = batcher.submit("e", [[1]], ["first"])
        await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, 30)
        rest = [f for i in range(3) for f in batcher.submit("e", [[1]], [i])]  # model busy
        return await asyncio.gather(*first, *rest)

    assert asyncio.run(staggered()) == ["e:first", "e:0", "e:1", "e:2"]
    batcher.close()
    assert runner.batches == [["first"], [0, 1, 2]]  # a busy model batches what queued


def test_a_failing_job_fails_alone():
    runner, stats = Recorder(), []
    batcher = Batcher(runner, max_batch_tokens=100, max_wait_s=0.2, observer=stats.append)
    batcher.start()
    results = asyncio.run(submit_all(batcher, [("e", 0), ("e", "bad"), ("e", 2)]))
    batcher.close()
    assert results[0] == "e:0" and results[2] == "e:2"
    assert isinstance(results[1], InputError)
    assert runner.batches == [[0, "bad", 2], [0], ["bad"], [2]]
    assert [s.failed for s in stats] == [True, False, True, False]


def test_keys_never_share_a_batch():
    runner = Recorder()
    batcher = Batcher(runner, max_batch_tokens=100, max_wait_s=0.2)
    batcher.start()
    results = asyncio.run(submit_all(batcher, [("x", 1), ("y", 2), ("x", 3)]))
    batcher.close()
    assert results == ["x:1", "y:2", "x:3"]
    assert runner.batches == [[1, 3], [2]]


def test_close_answers_queued_jobs_then_refuses_new_ones():
    runner = Recorder(delay=0.05)
    batcher = Batcher(runner, max_batch_tokens=2, max_wait_s=0.0)  # one job per batch
    batcher.start()

    async def scenario():
        futures = [f for i in range(4) for f in batcher.submit("e", [[1, 2]], [i])]
        await asyncio.sleep(0)
        closing = asyncio.get_running_loop().run_in_executor(None, batcher.close)
        results = await asyncio.gather(*futures)
        await closing
        with pytest.raises(ResourceError, match="shutting down"):
            batcher.submit("e", [[1]])
        return results

    assert asyncio.run(scenario()) == [f"e:{i}" for i in range(4)]
    assert len(runner.batches) == 4


def test_config_is_checked():
    with pytest.raises(ConfigError, match="max_batch_tokens must be > 0"):
        ServeConfig("m", max_batch_tokens=0)
    with pytest.raises(ConfigError, match="max_wait_ms must be >= 0"):
        ServeConfig("m", max_wait_ms=-1)
    with pytest.raises(ConfigError, match="model_name"):
        ServeConfig(" ")
    with pytest.raises(ConfigError, match="below the model's maximum length 128"):
        ServeConfig("m", max_batch_tokens=64).check_model_length(128)
    assert ServeConfig("m", max_wait_ms=0).max_wait_ms == 0


def test_several_workers_run_batches_at_once_and_all_stop():
    runner = Recorder(delay=0.3)
    batcher = Batcher(runner, max_batch_tokens=2, max_wait_s=0.0, workers=3)  # one job a batch
    batcher.start()
    start = time.perf_counter()
    results = asyncio.run(submit_all(batcher, [("e", i) for i in range(3)]))
    elapsed = time.perf_counter() - start
    batcher.close(timeout=10)
    assert results == ["e:0", "e:1", "e:2"] and len(runner.threads) == 3
    assert elapsed < 0.8, f"three 0.3 s batches on three workers took {elapsed:.2f} s"
    assert not any(t.is_alive() for t in batcher._threads)


# ------------------------------------------------------------------- tickets: cancel, expire
def test_cancelled_and_expired_tickets_are_never_computed():
    runner, dropped = Recorder(delay=0.3), []
    batcher = Batcher(runner, max_batch_tokens=100, max_wait_s=0.0)
    batcher.on_cancel = lambda reason, n: dropped.append((reason, n))
    batcher.start()

    async def scenario():
        held = batcher.submit("e", [[1]], ["held"])  # in the model for 0.3 s
        await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, 30)
        gone = batcher.ticket(None, 4)
        late = batcher.ticket(time.perf_counter() + 0.05, 2)
        stays = batcher.ticket(time.perf_counter() + 30, 2)
        futures = [*batcher.submit("e", [[1, 2], [3, 4]], ["gone", "gone"], gone),
                   *batcher.submit("e", [[1, 2]], ["late"], late),
                   *batcher.submit("e", [[1, 2]], ["stays"], stays)]
        assert batcher.queued_tokens == 8
        assert gone.cancel("disconnected") and not gone.cancel("expired")
        assert batcher.queued_tokens == 4
        return await asyncio.gather(*held, *futures, return_exceptions=True)

    results = asyncio.run(scenario())
    batcher.close()
    assert results[0] == "e:held" and results[4] == "e:stays"
    assert [r.reason for r in results[1:4]] == ["disconnected", "disconnected", "expired"]
    assert all(isinstance(r, JobCancelled) for r in results[1:4])
    assert runner.batches == [["held"], ["stays"]]  # control: the live job still ran
    assert sorted(dropped) == [("disconnected", 1), ("disconnected", 1), ("expired", 1)]
    assert batcher.queued_tokens == 0 and batcher.pending == 0


def test_a_ticket_cancelled_between_batches_is_dropped():
    """A request whose first jobs' batch is running leaves: its other batches never run."""
    tickets: list[Ticket] = []

    def runner(key, jobs):
        if jobs[0].payload == "short":  # the first planned batch: the client leaves meanwhile
            tickets[0].cancel("disconnected")
        return [j.payload for j in jobs]

    wasted: list[tuple[str, int]] = []
    batcher = Batcher(runner, max_batch_tokens=9, max_wait_s=0.2)
    batcher.on_wasted = lambda reason, n: wasted.append((reason, n))
    batcher.start()

    async def scenario():
        tickets.append(batcher.ticket(None, 10))
        # 2 + 8 tokens: two batches under a budget of 9 (length-sorted: "short" first).
        return await asyncio.gather(*batcher.submit("e", [[1] * 8, [1] * 2], ["long", "short"],
                                                    tickets[0]), return_exceptions=True)

    long, short = asyncio.run(scenario())
    batcher.close()
    assert short == "short"  # computed: the client left during its model call ...
    assert wasted == [("disconnected", 1)]  # ... which is counted as wasted
    assert isinstance(long, JobCancelled)  # the next batch of the request was not computed


def test_a_started_ticket_does_not_expire_and_a_late_one_does():
    released: list[int] = []
    ticket = Ticket(deadline=10.0, tokens=5, release=released.append)
    assert ticket.start(2, now=9.0) and ticket.started
    assert not ticket.cancel("expired") and ticket.start(3, now=11.0)  # started: runs on
    assert released == [2, 3] and ticket.queued_tokens == 0
    late = Ticket(deadline=10.0, tokens=5, release=released.append)
    assert not late.start(2, now=10.5) and late.reason == "expired"
    assert released == [2, 3, 5] and not late.start(2, now=10.6)


def test_admission_limits_are_sized_from_the_measured_speed():
    config = ServeConfig("m", max_queue_ms=1000)
    limits = size_limits(config, tokens_per_s=8000.0, max_length=128)
    assert limits.max_queue_tokens == 4000  # half a second of the model
    assert limits.max_concurrent_requests == 250  # 4000 tokens / 16
    assert limits.sized == ("max_queue_tokens", "max_concurrent_requests")
    slow = size_limits(config, tokens_per_s=10.0, max_length=128)
    assert slow.max_queue_tokens == 128 and slow.max_concurrent_requests == 16  # the floors
    given = size_limits(ServeConfig("m", max_queue_tokens=50, max_concurrent_requests=3), 8000.0,
                        128)
    assert (given.max_queue_tokens, given.max_concurrent_requests, given.sized) == (50, 3, ())
    with pytest.raises(ConfigError, match="max_queue_ms 2 must be above max_wait_ms 2.0"):
        ServeConfig("m", max_queue_ms=2)
    with pytest.raises(ConfigError, match="max_queue_tokens must be > 0"):
        ServeConfig("m", max_queue_tokens=0)
    with pytest.raises(ConfigError, match="API key 2 is empty or holds white space"):
        ServeConfig("m", api_keys=("good", "two words"))
    assert "good" not in repr(ServeConfig("m", api_keys=("good",)))  # keys stay out of logs


def test_a_sized_queue_bound_follows_the_rate_the_server_drains_it_at():
    from ultrafastbert.serve.admission import Admission, DrainRate

    queued = [0]
    admission = Admission(lambda: queued[0])
    admission.set_limits(size_limits(ServeConfig("m", max_queue_ms=1000), 8000.0, 128))
    assert admission.max_queue_tokens == 4000  # the start's measurement, until a busy second
    started, now = 0, 0.0
    for _ in range(300):  # 3 s with tokens always queued, 3,000 tokens/s served
        admission.drain.sample(now, started, queued=True)
        now, started = now + 0.01, started + 30
    assert admission.drain.trusted == pytest.approx(3000.0)
    assert admission.max_queue_tokens == 1500  # half a second at the served speed
    queued[0] = 1400
    assert admission.retry_after() == 1
    with pytest.raises(ServeError, match="the limit is 1500"):
        admission.check_tokens(200)
    # Idle time (nothing queued) teaches nothing: a quiet minute leaves the rate alone.
    admission.drain.sample(now + 60.0, started, queued=False)
    admission.drain.sample(now + 60.01, started, queued=True)
    assert admission.drain.trusted == pytest.approx(3000.0)
    assert admission.max_concurrent_requests == 93  # 1500 tokens / 16
    # The bound stays above 1/4 of the start's, however slow; it grows with a faster drain.
    crawl, fast = DrainRate(), DrainRate()
    for i in range(300):
        crawl.sample(i * 0.01, i, queued=True)
        fast.sample(i * 0.01, i * 400, queued=True)
    admission.drain = crawl
    assert admission.max_queue_tokens == 1000
    admission.drain = fast
    assert admission.max_queue_tokens == 20000 and admission.max_concurrent_requests == 1024
    given = Admission(lambda: 0)
    given.set_limits(size_limits(ServeConfig("m", max_queue_tokens=50), 8000.0, 128))
    given.drain = crawl
    assert given.max_queue_tokens == 50  # a bound given is the bound


# ----------------------------------------------------------------- the event loop, the OS
def test_the_loop_lag_probe_sees_a_blocked_event_loop():
    from ultrafastbert.serve.app import watch_loop_lag

    lags: list[float] = []

    async def main() -> None:
        probe = asyncio.ensure_future(watch_loop_lag(lags.append, period=0.01))
        await asyncio.sleep(0.05)
        quiet = len(lags)
        time.sleep(0.2)  # the loop is stuck: the probe's timer fires late
        await asyncio.sleep(0.05)
        probe.cancel()
        assert quiet >= 2

    asyncio.run(main())
    assert max(lags) >= 0.15
    assert sorted(lags)[len(lags) // 2] < 0.1  # control: most wake-ups were on time


def _thread_stat(tid: int) -> tuple[str, int]:
    """(name, nice) of one thread of this process, from /proc."""
    import os
    from pathlib import Path

    stat = Path(f"/proc/{os.getpid()}/task/{tid}/stat").read_text()
    name = stat.split("(", 1)[1].rsplit(")", 1)[0]
    return name, int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names and nice: Linux")
def test_a_thread_can_name_itself_and_lower_only_its_own_priority():
    from ultrafastbert.serve.osthread import lower_priority, set_native_name

    seen: dict[str, object] = {}

    def worker() -> None:
        seen["named"] = set_native_name("ufb-test-thread-long-name")
        seen["nice"] = lower_priority(4)
        seen["stat"] = _thread_stat(threading.get_native_id())

    main_before = _thread_stat(threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["named"] is True
    name, nice = seen["stat"]
    assert name == "ufb-test-thread"  # 15 bytes kept
    assert nice == seen["nice"] == min(19, main_before[1] + 4)
    assert _thread_stat(threading.get_native_id()) == main_before  # the caller only
    assert lower_priority(0) is None


def test_the_service_freezes_the_heap_and_turns_the_tokenizers_pool_off_unless_told(tmp_path, monkeypatch):
    from servestub import StubPredictor
    from ultrafastbert.serve.service import Service

    for given, want in ((None, "false"), ("true", "true")):
        if given is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", given)
        service = Service(StubPredictor(tmp_path / "calls", None), ServeConfig("m"))
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        service.start()
        try:
            assert os.environ["TOKENIZERS_PARALLELISM"] == want
            assert gc.get_freeze_count() > 1000  # the heap is out of the collections
            assert service.limits is not None and service.limits.tokens_per_s > 0
        finally:
            service.close()
            gc.unfreeze()


def test_an_answer_joined_from_json_made_by_the_model_is_the_answer_encoded_whole():
    import json

    import numpy as np

    from ultrafastbert.serve.app import _embeddings_json, _json
    from ultrafastbert.serve.modelproc import Encoded

    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]
    encoded = [Encoded(v, json.dumps(v.tolist(), separators=(",", ":")).encode())
               for v in vectors]
    usage = {"prompt_tokens": 7, "total_tokens": 7}
    joined = _embeddings_json(encoded, 'a "quoted" name', usage).body
    whole = _json({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": v.tolist()}
        for i, v in enumerate(vectors)], "model": 'a "quoted" name', "usage": usage}).body
    assert joined == whole
    assert json.loads(joined)["data"][2]["embedding"] == vectors[2].tolist()
