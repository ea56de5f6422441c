"""Event streams under pressure: a slow consumer is cut off alone; shutdown with open streams is prompt."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import aiohttp

from imagegen.events import BROADCASTER, Broadcaster

from .conftest import TestDatabase, create_job
from .serverproc import ServerProcess
from .sse import SSEReader


async def test_a_subscription_that_falls_behind_is_closed_and_others_keep_receiving() -> None:
    from imagegen.store import JobEvent

    broadcaster = Broadcaster(buffer=3)
    slow, fast = broadcaster.subscribe(), broadcaster.subscribe()
    overflowed = []
    slow.on_overflow = lambda: overflowed.append(True)
    received = []
    for seq in range(1, 11):
        broadcaster.publish([JobEvent(seq, "job.progress", "00000000-0000-4000-8000-000000000001", "{}", 1, "processing")])
        received.append((await fast.next()).seq)
    assert received == list(range(1, 11))
    assert slow.closed == "overflow" and overflowed == [True]
    assert await slow.next() is None  # its buffer is dropped: it resumes from the table by id


def _stalled_stream(port: int) -> socket.socket:
    """A client that asks for the stream and then never reads: a tiny receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /generations/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def _drain(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read what the server sent; True if it then closed or reset the connection."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), True
    except ConnectionResetError:
        return b"".join(chunks), True
    except TimeoutError:
        return b"".join(chunks), False


async def test_a_stalled_client_is_disconnected_while_the_others_get_everything(make_client) -> None:
    # A buffer well below the ~480 events to come, yet above a burst the PostgreSQL feed may
    # publish at once when it trails a busy machine (it reads the event log a page at a time).
    client = await make_client(events={"subscriber_buffer": 200}, workers={"count": 2})
    fast = SSEReader(await client.get("/generations/events"))
    assert (await fast.next()).name == "ready"
    stalled = await asyncio.to_thread(_stalled_stream, client.port)
    broadcaster = client.app[BROADCASTER]
    while broadcaster.subscriber_count < 2:  # the stalled client's handler has subscribed
        await asyncio.sleep(0.01)
    # Long prompts make each event about 1 KB, so the stalled socket's buffers fill quickly.
    ids = [await create_job(client, numImages=10, prompt="p" * 500) for _ in range(40)]
    completed: set[str] = set()

    def all_completed(event) -> bool:
        if event.name == "job.completed":
            completed.add(event.job["jobId"])
        return completed == set(ids)

    # Ends only once the fast subscriber has seen every job complete: it missed nothing.
    events = await fast.until(all_completed, timeout=60)
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    data, closed = await asyncio.to_thread(_drain, stalled, 10)
    stalled.close()
    assert closed, "the stalled subscriber was disconnected"
    assert 0 < data.count(b"event: job.") < len(events), "it got a prefix, then was cut off"
    deadline = time.monotonic() + 5
    while broadcaster.subscriber_count != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # its handler unsubscribes as it unwinds
    assert broadcaster.subscriber_count == 1


async def test_shutdown_with_many_open_streams_is_prompt(database: TestDatabase) -> None:
    server = ServerProcess(database.data_dir, {**database.env, "IMAGEGEN_WORKERS__SHUTDOWN_GRACE_S": "10"})
    server.start()
    streams = 500
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            readers = []
            for _ in range(streams):
                readers.append(SSEReader(await session.get(f"{server.url}/generations/events")))
            for reader in readers:
                assert (await reader.next()).name == "ready"
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            ends = await asyncio.gather(*(reader.rest(timeout=10) for reader in readers))
            await asyncio.to_thread(server.proc.wait, 30)
            took = time.monotonic() - started
        assert all(events == [] for events in ends)  # each stream simply ended
        assert server.proc.returncode == 0
        assert took < 5, f"{streams} open streams held shutdown for {took:.1f}s"
    finally:
        if server.proc.poll() is None:
            server.kill9()
