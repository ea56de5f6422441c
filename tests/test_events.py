"""Server-sent events over a real socket: order, commit-before-publish, replay, reset, slow consumers."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from imagegen.store import STORE

from .conftest import TestDatabase, create_job, prune, wait_for_status
from .sse import SSEReader, is_terminal_of

LIFE = ["job.created", "job.processing", "job.progress", "job.progress", "job.progress", "job.completed"]


async def open_stream(client: TestClient, path: str, last_id: int | None = None, **kwargs) -> SSEReader:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    response = await client.get(path, headers=headers, **kwargs)
    assert response.status == 200, await response.text()
    return SSEReader(response)


async def test_stream_headers_retry_and_heartbeat(make_client) -> None:
    client = await make_client(events={"heartbeat_s": 0.05, "retry_ms": 1500})
    reader = await open_stream(client, "/generations/events")
    headers = reader.response.headers
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    ready = await reader.next()
    assert ready.name == "ready" and ready.seq == 0 and reader.retry == 1500
    job_id = await create_job(client)
    await reader.until(is_terminal_of(job_id))
    await wait_for_status(client, job_id, {"completed"})
    assert await reader.comment() == "ping"  # heartbeats are comment lines, every heartbeat_s


async def test_a_jobs_events_arrive_in_order_with_increasing_ids(client: TestClient) -> None:
    reader = await open_stream(client, "/generations/events")
    await reader.next()  # ready
    job_id = await create_job(client, numImages=3)
    events = await reader.until(is_terminal_of(job_id))
    assert [e.name for e in events] == LIFE
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.job["progress"]["done"] for e in events] == [0, 0, 1, 2, 3, 3]
    # Each event carries the job exactly as GET shows it at that moment: the last one, now.
    final = await (await client.get(f"/generations/{job_id}")).json()
    assert events[-1].job == final
    assert events[2].job["imageUrls"] == final["imageUrls"][:1]


async def test_no_event_is_seen_before_its_commit(client: TestClient, database: TestDatabase) -> None:
    reader = await open_stream(client, "/generations/events")
    await reader.next()
    job_ids = [await create_job(client, numImages=2) for _ in range(3)]
    events = await reader.until(lambda e: e.name == "job.completed" and e.job["jobId"] == job_ids[-1])
    for event in events:
        # The moment we hold the event, a separate connection already sees it committed,
        # and the job row is at least as far along.
        (row,) = database.rows("SELECT name FROM events WHERE seq = ?", (event.seq,))
        assert row["name"] == event.name
        (job,) = database.rows("SELECT updated_at FROM jobs WHERE id = ?", (event.job["jobId"],))
        assert job["updated_at"] >= event.job["updatedAt"]


async def test_one_jobs_stream_starts_with_its_state_and_ends_after_the_terminal_event(make_client) -> None:
    client = await make_client(provider={"delay_s": 0.05})
    job_id = await create_job(client, numImages=3)
    reader = await open_stream(client, f"/generations/{job_id}/events")
    events = await reader.rest()
    # The first event is the job's state when we connected; every later change follows it.
    assert events[0].name in {"job.created", "job.processing", "job.progress"}
    assert [e.name for e in events] == LIFE[len(LIFE) - len(events):]
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))


async def test_a_finished_jobs_stream_sends_the_final_state_and_ends_at_once(client: TestClient) -> None:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    reader = await open_stream(client, f"/generations/{job_id}/events")
    (event,) = await reader.rest()
    assert event.name == "job.completed" and event.job["status"] == "completed"
    # Reconnecting with that id: nothing more will ever come, and 204 makes EventSource stop.
    again = await client.get(f"/generations/{job_id}/events", headers={"Last-Event-ID": event.id})
    assert again.status == 204


async def test_unknown_or_malformed_job_stream(client: TestClient) -> None:
    unknown = await client.get("/generations/00000000-0000-4000-8000-000000000000/events")
    assert unknown.status == 404 and unknown.content_type == "application/problem+json"
    malformed = await client.get("/generations/nope/events")
    assert malformed.status == 422


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "9" * 30])
async def test_bad_last_event_id_is_422(client: TestClient, value: str) -> None:
    response = await client.get("/generations/events", headers={"Last-Event-ID": value})
    assert response.status == 422 and response.content_type == "application/problem+json"
    response = await client.get("/generations/events", params={"lastEventId": value})
    assert response.status == 422


async def test_replay_after_a_drop_at_every_point_has_no_gap_and_no_duplicate(make_client) -> None:
    client = await make_client(provider={"delay_s": 0.02})
    for drop_after in range(1, len(LIFE)):
        first = await open_stream(client, "/generations/events")
        await first.next()  # ready
        job_id = await create_job(client, numImages=3)
        before = [await first.next() for _ in range(drop_after)]
        first.response.close()  # the connection drops mid-job
        # Resume by header for odd points, by query parameter for even ones.
        if drop_after % 2:
            second = await open_stream(client, "/generations/events", last_id=before[-1].seq)
        else:
            second = await open_stream(client, "/generations/events", params={"lastEventId": before[-1].id})
        after = await second.until(is_terminal_of(job_id))
        second.response.close()
        events = before + after
        assert [e.name for e in events] == LIFE, drop_after
        seqs = [e.seq for e in events]
        assert seqs == sorted(set(seqs)), drop_after


async def test_replay_works_across_a_restart(make_client, database: TestDatabase) -> None:
    data = database.data_dir
    first = await make_client(data)
    reader = await open_stream(first, "/generations/events")
    await reader.next()
    job_id = await create_job(first, numImages=3)
    events = await reader.until(is_terminal_of(job_id))
    reader.response.close()
    await first.close()

    second = await make_client(data)
    replay = await open_stream(second, "/generations/events", last_id=events[1].seq)
    again = [await replay.next() for _ in range(len(events) - 2)]
    assert [(e.seq, e.name) for e in again] == [(e.seq, e.name) for e in events[2:]]
    # The same job, with image URLs based on the new server's address.
    assert again[-1].job["imageUrls"][0].startswith(str(second.make_url("")).rstrip("/"))


async def test_too_old_an_id_gets_a_reset_then_the_current_state(make_client) -> None:
    client = await make_client(events={"retention": 3})
    ids = [await create_job(client) for _ in range(3)]
    for job_id in ids:
        await wait_for_status(client, job_id, {"completed"})
    pruned_through = await prune(client)
    assert pruned_through > 1
    reader = await open_stream(client, "/generations/events", last_id=1)
    reset = await reader.next()
    latest, _ = await client.app[STORE].horizon()
    assert reset.name == "reset" and reset.seq == latest
    states = [await reader.next() for _ in ids]
    assert [s.name for s in states] == ["job.state"] * 3 and all(s.id is None for s in states)
    assert [s.job["jobId"] for s in states] == ids[::-1]
    assert all(s.job["status"] == "completed" for s in states)
    # Then it is live: a new job's events follow, with ids after the reset's.
    new = await create_job(client)
    live = await reader.until(is_terminal_of(new))
    assert live[0].name == "job.created" and live[0].seq > reset.seq


async def test_an_id_from_the_future_gets_a_reset(client: TestClient) -> None:
    reader = await open_stream(client, "/generations/events", last_id=10_000)
    reset = await reader.next()
    assert reset.name == "reset" and reset.seq == 0
    assert reset.job["lastEventId"] == 0 and "retained" in reset.job["reason"]


async def test_a_pruned_jobs_stream_resets_to_its_state(make_client) -> None:
    client = await make_client(events={"retention": 1})
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    other = await create_job(client)
    await wait_for_status(client, other, {"completed"})
    await prune(client)
    reader = await open_stream(client, f"/generations/{job_id}/events", last_id=1)
    events = await reader.rest()
    assert [e.name for e in events] == ["reset", "job.state"]
    assert events[1].job["status"] == "completed"


async def test_pruning_keeps_the_newest_events(make_client, database: TestDatabase) -> None:
    client = await make_client(events={"retention": 4})
    job_id = await create_job(client, numImages=3)
    await wait_for_status(client, job_id, {"completed"})
    await prune(client)
    rows = database.rows("SELECT name FROM events ORDER BY seq")
    assert [r["name"] for r in rows] == LIFE[-4:]


async def test_a_running_jobs_stream_with_too_old_an_id_resets_to_its_state_then_goes_live(make_client) -> None:
    client = await make_client(events={"retention": 1}, provider={"delay_s": 0.2})
    job_id = await create_job(client, numImages=3)
    await wait_for_status(client, job_id, {"processing"})
    assert await prune(client) >= 1  # event 1 (job.created) is gone
    reader = await open_stream(client, f"/generations/{job_id}/events", last_id=0)
    events = await reader.rest()
    assert [e.name for e in events[:2]] == ["reset", "job.state"]
    assert events[1].job["status"] == "processing"
    assert events[-1].name == "job.completed", "then its changes, live, to the end"


async def test_a_finished_job_with_pruned_events_gives_an_id_then_204(make_client) -> None:
    client = await make_client(events={"retention": 1})
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    await wait_for_status(client, await create_job(client), {"completed"})
    await prune(client)
    reader = await open_stream(client, f"/generations/{job_id}/events")
    ready, state = await reader.rest()
    assert (ready.name, state.name, state.job["status"]) == ("ready", "job.state", "completed")
    again = await client.get(f"/generations/{job_id}/events", headers={"Last-Event-ID": ready.id})
    assert again.status == 204


async def test_a_replay_that_retention_overtakes_says_so(make_client) -> None:
    from imagegen.events import REPLAY_PAGE, ReplayGap, replay
    from imagegen.jobs import JOBS, timestamp_in

    # The default retention: the background upkeep, which may run while the jobs are being
    # created (on PostgreSQL its first pass races them), prunes nothing; the pass below does.
    client = await make_client(workers={"max_pending": 10_000})
    jobs, store = client.app[JOBS], client.app[STORE]
    await asyncio.gather(*(jobs.create(1, "cat") for _ in range(REPLAY_PAGE + 50)))
    events = replay(store, 0)
    first = await anext(events)  # the first page is read
    assert first.seq == 1
    # Retention (keeping 10 events) catches up with the replay. On PostgreSQL a pass finding
    # another one under way returns at once, so the wait is for the pass that pruned.
    async with asyncio.timeout(10):
        while await store.prune(10, timestamp_in(-86_400)) <= REPLAY_PAGE:
            await asyncio.sleep(0.01)
    with pytest.raises(ReplayGap):
        async for _ in events:
            pass
