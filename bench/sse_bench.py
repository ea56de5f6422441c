"""SSE benchmark: how many event streams one imagegen process holds, and how fast events reach them.

    .venv/bin/python bench/sse_bench.py [--subscribers 10000] [--rate 0.3] [--duration 20]

The real service (`server.py`, fresh data directory) runs as a child process; separate load
processes open the streams on 127.0.0.1 with raw asyncio sockets: one "sampler" process whose
streams parse every event and time it, and `--client-procs` "drainer" processes whose streams
only count frames. In order:

1. real, 1 subscriber: jobs flow at `--rate` jobs/s for `--duration` s; latency of one stream;
2. real, N subscribers: N streams opened (server RSS before/after -> KB per subscriber), the
   same job flow, latency on the `--sample` sampled streams, every stream checked for the
   whole sequence of events;
3. SIGTERM to the real service with the N streams open: seconds until it exits;
4. bare, 1 then N subscribers, and SIGTERM: the same on bench/sse_baseline_app.py, an
   aiohttp-sse fan-out with none of the service's work (skip with --no-bare).

Latency is from an event's `updatedAt` (the server stamps it just before the change's group
commit) to the moment the load process reads the frame, both from the same clock. Results
are printed as a table and written to bench/results/sse.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results" / "sse.json"

# --- the load processes --------------------------------------------------------------------
#
# A load process reads one JSON command per line on stdin and answers one JSON line on stdout;
# it exits when stdin closes (the driver is gone), so it can never outlive a run.

EVENT = re.compile(rb"id: (\d+)\nevent: ([\w.]+)\ndata: ")
READY = re.compile(rb"id: (\d+)\nevent: ready\n")
UPDATED_AT = re.compile(rb'"updatedAt":"([^"]+)"')
# aiohttp-sse ends a stream with the last chunk of the chunked encoding.
LAST_CHUNK = b"0\r\n\r\n"


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (10k sockets need 10k fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Stream(asyncio.Protocol):
    """One `GET /generations/events` stream: waits for `ready`, then counts (or parses) frames."""

    def __init__(self, request: bytes, sampled: bool, published: dict[int, tuple[bytes, bytes]]) -> None:
        self.request = request
        self.sampled = sampled
        self.published = published  # id -> (name, data) of each event, shared by the process
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.head = b""  # everything up to the end of the ready event
        self.buf = b""  # a sampled stream's unfinished frame
        self.last_byte = b""  # so that a "\n\n" split between two reads is counted once
        self.tail = b""  # the last bytes read, to tell a clean end from a cut
        self.frames = 0  # frames after `ready` (every one an event with an id)
        self.mark = 0  # `frames` when the current phase began
        self.events: list[tuple[int, float]] = []  # (id, time read), sampled streams, this phase
        self.last_frame_at = 0.0
        self.closed_at: float | None = None
        self.ended = ""  # how the stream ended: end (last chunk), eof, reset, local
        self.we_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.tail = (self.tail + data)[-len(LAST_CHUNK) :]
        if not self.ready.done():
            self.head += data
            match = READY.search(self.head)
            end = self.head.find(b"\n\n", match.end()) if match else -1
            refused = len(self.head) >= 13 and not self.head.startswith(b"HTTP/1.1 200 ")
            if refused or len(self.head) > 65536:
                self.ready.set_exception(ConnectionError(f"not a stream: {self.head[:80]!r}"))
                self.close()
                return
            if end < 0:
                return
            self.ready.set_result(int(match[1]))
            data, self.head = self.head[end + 2 :], b""
            if not data:
                return
        if self.sampled:
            *frames, self.buf = (self.buf + data).split(b"\n\n")
            for frame in frames:
                match = EVENT.search(frame)
                if match is None:
                    continue  # a heartbeat comment
                seq = int(match[1])
                self.events.append((seq, now))
                self.frames += 1
                self.last_frame_at = now
                if seq not in self.published:
                    self.published[seq] = (match[2], frame[match.end() :])
        else:
            count = (self.last_byte + data).count(b"\n\n")
            self.last_byte = data[-1:]
            if count:
                self.frames += count
                self.last_frame_at = now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_at = time.time()
        if self.we_closed:
            self.ended = "local"
        elif exc is not None:
            self.ended = "reset"
        else:
            self.ended = "end" if self.tail == LAST_CHUNK else "eof"
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({self.ended})"))

    def close(self) -> None:
        if self.transport is not None and self.closed_at is None:
            self.we_closed = True
            self.transport.abort()


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max (nearest rank) of `values` in seconds, as milliseconds."""
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000

    return {
        "count": len(ordered),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": ordered[-1] * 1000,
    }


def iso_to_epoch(text: bytes) -> float:
    return datetime.fromisoformat(text.decode()).timestamp()


class LoadProcess:
    """The streams of one load process, and the commands the driver sends it."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.published: dict[int, tuple[bytes, bytes]] = {}

    def live(self) -> list[Stream]:
        return [s for s in self.streams if s.ready.done() and not s.ready.exception()]

    async def open(
        self, port: int, count: int, sampled: bool, concurrency: int, timeout: float
    ) -> dict[str, Any]:
        """Open `count` streams, at most `concurrency` connecting at once; wait for each `ready`."""
        loop = asyncio.get_running_loop()
        request = (
            f"GET /generations/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        gate = asyncio.Semaphore(concurrency)
        failures: collections.Counter[str] = collections.Counter()
        started = time.monotonic()

        async def one() -> None:
            async with gate:
                try:
                    _, stream = await loop.create_connection(
                        lambda: Stream(request, sampled, self.published), "127.0.0.1", port
                    )
                except OSError as exc:
                    failures[f"connect: {exc.strerror or type(exc).__name__}"] += 1
                    return
                self.streams.append(stream)
                try:
                    await asyncio.wait_for(asyncio.shield(stream.ready), timeout)
                except (ConnectionError, TimeoutError) as exc:
                    failures[f"ready: {type(exc).__name__}"] += 1
                    stream.close()

        await asyncio.gather(*(one() for _ in range(count)))
        return {"ready": len(self.live()), "failures": dict(failures), "seconds": time.monotonic() - started}

    def mark(self) -> dict[str, Any]:
        """A phase begins: count frames and record events from here."""
        for stream in self.streams:
            stream.mark = stream.frames
            stream.events = []
        self.published.clear()
        live = self.live()
        return {"live": len(live), "open": sum(s.closed_at is None for s in live)}

    async def wait(self, frames: int, timeout: float) -> dict[str, Any]:
        """Wait until every live stream has read `frames` frames since the mark (or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [s for s in self.live() if s.closed_at is None and s.frames - s.mark < frames]
            if not waiting or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # polling the streams' counters, bounded by the deadline
        return {"waiting": len(waiting)}

    def report(self, since: int, through: int) -> dict[str, Any]:
        """What the streams read in this phase: completeness, and the sampled latencies."""
        expected = through - since
        live = self.live()
        cut = [s for s in live if s.closed_at is not None and not s.we_closed]
        counts = [s.frames - s.mark for s in live]
        out: dict[str, Any] = {
            "streams": len(live),
            "closed_by_server": len(cut),
            "closed_how": dict(collections.Counter(s.ended for s in cut)),
            "complete": sum(c == expected for c in counts),
            "short": sum(c < expected for c in counts),
            "over": sum(c > expected for c in counts),
            "deliveries": sum(counts),
            "last_frame_at": max((s.last_frame_at for s in live if s.frames > s.mark), default=0.0),
        }
        sampled = [s for s in live if s.sampled]
        if sampled:
            published = {
                seq: iso_to_epoch(UPDATED_AT.search(data)[1]) for seq, (_, data) in self.published.items()
            }
            latencies: list[float] = []
            reads: dict[int, list[float]] = collections.defaultdict(list)
            gaps = duplicates = disorder = 0
            for stream in sampled:
                seqs = [seq for seq, _ in stream.events]
                duplicates += len(seqs) - len(set(seqs))
                # Ids skipped before the last one read; ids not read yet at all make the stream
                # incomplete, not gapped.
                gaps += len(set(range(since + 1, max(seqs, default=since) + 1)) - set(seqs))
                disorder += sum(b <= a for a, b in itertools.pairwise(seqs))
                for seq, read_at in stream.events:
                    latencies.append(read_at - published[seq])
                    reads[seq].append(read_at)
            out["latency"] = percentiles(latencies)
            out["last_published_at"] = max(published.values(), default=0.0)
            # Per event: when the first sampled stream read it, and how long until the last did.
            out["first_read"] = percentiles([min(r) - published[seq] for seq, r in reads.items()])
            out["spread"] = percentiles([max(r) - min(r) for r in reads.values()])
            out.update(gaps=gaps, duplicates=duplicates, disorder=disorder, sampled=len(sampled))
            out["event_names"] = dict(
                collections.Counter(name.decode() for name, _ in self.published.values())
            )
            sizes = [len(data) for _, data in self.published.values()]
            out["data_bytes"] = sum(sizes) / len(sizes) if sizes else 0
            done = [data for name, data in self.published.values() if name == b"job.completed"]
            out["template"] = done[-1].decode() if done else None
        return out

    async def watch_close(self, timeout: float) -> dict[str, Any]:
        """Wait until the server has closed every live stream (after a SIGTERM)."""
        deadline = time.monotonic() + timeout
        live = self.live()
        while any(s.closed_at is None for s in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling the streams, bounded by the deadline
        closed = [s for s in live if s.closed_at is not None]
        return {
            "streams": len(live),
            "still_open": len(live) - len(closed),
            "how": dict(collections.Counter(s.ended for s in closed)),
            "last_close": max((s.closed_at for s in closed), default=0.0),  # type: ignore[type-var]
        }

    def forget(self) -> dict[str, Any]:
        for stream in self.streams:
            stream.close()
        self.streams.clear()
        return {}


async def load_process_main() -> None:
    """The load process: commands on stdin, answers on stdout, until stdin closes."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    load = LoadProcess()
    while line := await reader.readline():
        command = json.loads(line)
        name = command.pop("cmd")
        try:
            result = getattr(load, name)(**command)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:  # the driver reports it and stops the run
            result = {"error": f"{name}: {type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    load.forget()


# --- child processes -----------------------------------------------------------------------

CHILDREN: list[subprocess.Popen[bytes]] = []
# Streams open in this many rounds, each process opening a share in each.
OPEN_ROUNDS = 20


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None, pipes: bool = False
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (so Ctrl-C reaches only the driver, which stops it).
    It inherits the driver's raised open-files limit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stderr=log,
            stdout=subprocess.PIPE if pipes else log,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            start_new_session=True,
        )
    CHILDREN.append(proc)
    return proc


def stop_children() -> None:
    """Stop every child: load processes exit when their stdin closes; kill what is left."""
    for proc in CHILDREN:
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        elif proc.poll() is None:
            proc.terminate()  # a server the run did not get to stop
    for proc in CHILDREN:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process, all its threads, has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class LoadClient:
    """The driver's handle on one load process."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    reader: asyncio.StreamReader = field(repr=False)

    @classmethod
    async def start(cls, name: str, tmp: Path) -> LoadClient:
        log = tmp / f"{name}.log"
        proc = spawn([sys.executable, str(Path(__file__).resolve()), "--load-process"], log, pipes=True)
        reader = asyncio.StreamReader(limit=1 << 24)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), proc.stdout
        )
        return cls(name, proc, log, reader)

    def send(self, cmd: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.proc.stdin.flush()

    async def receive(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise RuntimeError(f"load process {self.name} died:\n{self.log.read_text()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load process {self.name}: {reply['error']}")
        return reply

    async def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return await self.receive()


@dataclass
class Target:
    """A server under test: the real service or the bare fan-out."""

    kind: str  # "real" or "bare"
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_target(
    http: Any, kind: str, tmp: Path, args: argparse.Namespace, job_file: Path | None = None
) -> Target:
    port = free_port()
    log = tmp / f"{kind}-{port}.log"
    if kind == "real":
        data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=tmp))
        env = {
            **os.environ,
            "IMAGEGEN_STORAGE__DATA_DIR": str(data_dir),
            # Small images: drawing them must not be what the benchmark measures.
            "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64",
            "IMAGEGEN_WORKERS__COUNT": str(args.workers),
            "IMAGEGEN_EVENTS__SUBSCRIBER_BUFFER": str(args.buffer),
        }
        proc = spawn([sys.executable, "server.py", "--port", str(port)], log, env)
        ready_path = "/generations?limit=1"
    else:
        assert job_file is not None
        argv = [
            sys.executable,
            str(BENCH / "sse_baseline_app.py"),
            "--port",
            str(port),
            "--job-file",
            str(job_file),
            "--buffer",
            str(args.buffer),
            "--mode",
            args.bare_mode,
        ]
        proc = spawn(argv, log)
        ready_path = "/busy"
    target = Target(kind, proc, port, log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            async with http.get(target.url + ready_path) as response:
                if response.status == 200:
                    return target
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} did not start:\n{log.read_text()[-2000:]}")
        await asyncio.sleep(0.05)  # the port is not open yet; bounded by the deadline


async def latest_event_id(http: Any, target: Target) -> int:
    """The newest event id, from the `ready` event of a fresh stream."""
    async with http.get(target.url + "/generations/events") as response:
        head = b""
        while (match := READY.search(head)) is None:
            head += await response.content.readany()
        return int(match[1])


async def until_idle(http: Any, target: Target, deadline: float) -> bool:
    """Wait until the server has no job left to run (every job's events are committed);
    False if it still has some at the deadline (time.monotonic())."""
    while time.monotonic() < deadline:
        if target.kind == "bare":
            async with http.get(target.url + "/busy") as response:
                if (await response.json())["busy"] == 0:
                    return True
        else:
            busy = 0
            for status in ("pending", "processing"):
                async with http.get(f"{target.url}/generations?limit=1&status={status}") as response:
                    busy += len((await response.json())["jobs"])
            if busy == 0:
                return True
        await asyncio.sleep(0.1)  # polling the workers' progress, bounded by the deadline
    return False


async def post_jobs(http: Any, target: Target, rate: float, duration: float, images: int) -> dict[str, Any]:
    """POST /generations at a steady `rate` for `duration` seconds; each on its own schedule."""
    count = max(1, round(rate * duration))
    start = time.monotonic()
    late: list[float] = []
    last_sent = start

    async def one(i: int) -> tuple[int, float]:
        nonlocal last_sent
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        sent = last_sent = time.monotonic()
        late.append(sent - (start + i / rate))
        async with http.post(target.url + "/generations", json={"numImages": images}) as response:
            await response.read()
            return response.status, time.monotonic() - sent

    answers = await asyncio.gather(*(one(i) for i in range(count)))
    return {
        "jobs": count,
        "statuses": dict(collections.Counter(str(status) for status, _ in answers)),
        "post_latency": percentiles([seconds for _, seconds in answers]),
        "schedule_lag_max_ms": max(late) * 1000,
        "send_seconds": last_sent - start,
        "answered_seconds": time.monotonic() - start,
    }


async def job_flow(
    http: Any, target: Target, clients: list[LoadClient], args: argparse.Namespace
) -> dict[str, Any]:
    """Jobs at the steady rate; then wait (up to --drain-timeout) until the jobs are done and
    every stream has read every event; collect what the streams read."""
    first = await latest_event_id(http, target)
    for client in clients:
        await client.ask("mark")
    user_before, system_before = cpu_seconds(target.proc.pid)
    load_before = sum(sum(cpu_seconds(c.proc.pid)) for c in clients)
    started = time.time()
    posts = await post_jobs(http, target, args.rate, args.duration, args.images)
    deadline = time.monotonic() + args.drain_timeout
    idle = await until_idle(http, target, deadline)
    last = await latest_event_id(http, target)
    events = last - first
    remaining = max(0.0, deadline - time.monotonic())
    waits = await asyncio.gather(*(c.ask("wait", frames=events, timeout=remaining) for c in clients))
    user_after, system_after = cpu_seconds(target.proc.pid)
    load_cpu = sum(sum(cpu_seconds(c.proc.pid)) for c in clients) - load_before
    reports = await asyncio.gather(*(c.ask("report", since=first, through=last) for c in clients))
    sampler = reports[0]
    deliveries = sum(r["deliveries"] for r in reports)
    wall = max(r["last_frame_at"] for r in reports) - started
    # The last event was stamped this long after the first POST: the span the events were made in.
    made = sampler.get("last_published_at", 0.0) - started
    server_cpu = (user_after - user_before) + (system_after - system_before)
    return {
        "subscribers": sum(r["streams"] for r in reports),
        "events": events,
        "posts": posts,
        "jobs_done_before_deadline": idle,
        "deliveries": deliveries,
        "offered_deliveries_per_s": events * sum(r["streams"] for r in reports) / made if made > 0 else 0.0,
        "delivery_seconds": wall,
        "deliveries_per_s": deliveries / wall if wall > 0 else 0.0,
        "complete": sum(r["complete"] for r in reports),
        "short": sum(r["short"] for r in reports),
        "over": sum(r["over"] for r in reports),
        "still_waiting_at_deadline": sum(w["waiting"] for w in waits),
        "closed_by_server": sum(r["closed_by_server"] for r in reports),
        "closed_how": dict(
            sum((collections.Counter(r["closed_how"]) for r in reports), collections.Counter())
        ),
        "server_cpu_s": server_cpu,
        "server_system_cpu_s": system_after - system_before,
        "load_cpu_s": load_cpu,
        "sampled": sampler.get("sampled", 0),
        "latency_ms": sampler.get("latency"),
        "first_read_ms": sampler.get("first_read"),
        "spread_ms": sampler.get("spread"),
        "gaps": sampler.get("gaps"),
        "duplicates": sampler.get("duplicates"),
        "disorder": sampler.get("disorder"),
        "event_names": sampler.get("event_names"),
        "data_bytes": sampler.get("data_bytes"),
        "template": sampler.get("template"),
    }


def fanout_cost(one: dict[str, Any], many: dict[str, Any]) -> dict[str, float | None]:
    """Server CPU per delivery, net of the jobs' own work: the 1-subscriber phase gives the CPU
    per event of running the jobs (and delivering to one stream); what the N-subscriber phase
    used beyond that, for its events, went to the other deliveries."""
    if not one["events"] or many["deliveries"] <= many["events"]:
        return {"us_per_delivery": None, "capacity_per_s": None, "max_events_per_s": None}
    jobs_cpu = one["server_cpu_s"] / one["events"] * many["events"]
    us = (many["server_cpu_s"] - jobs_cpu) / (many["deliveries"] - many["events"]) * 1e6
    capacity = 1e6 / us if us > 0 else None
    # One event loop does the fan-out: one core's worth of deliveries per second, at most.
    return {
        "us_per_delivery": us,
        "capacity_per_s": capacity,
        "max_events_per_s": capacity / many["subscribers"] if capacity and many["subscribers"] else None,
    }


async def open_streams(
    target: Target, clients: list[LoadClient], total: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Bring the number of ready streams up to `total`: the sampler's to --sample, the drainers'
    the rest. They open in rounds, every process a share in each, so the sampled streams are
    spread evenly through the server's subscriber order (a dict keeps the order of arrival)."""
    rss_before = proc_status(target.proc.pid)["VmRSS"]
    live = [(await c.ask("mark"))["live"] for c in clients]
    sample = min(args.sample, total)
    drainers = clients[1:]
    rest = max(0, total - max(sample, live[0]) - sum(live[1:]))
    shares = [rest // len(drainers) + (i < rest % len(drainers)) for i in range(len(drainers))]
    wanted = [max(0, sample - live[0]), *shares]
    per_process = max(1, args.connect_concurrency // len(clients))
    rounds = max(1, min(OPEN_ROUNDS, sum(wanted) // 100))
    started = time.monotonic()
    held = 0
    failures: collections.Counter[str] = collections.Counter()
    for number in range(rounds):
        for client, count, sampled in zip(clients, wanted, [True] + [False] * len(drainers)):
            share = count * (number + 1) // rounds - count * number // rounds
            client.send(
                "open", port=target.port, count=share, sampled=sampled, concurrency=per_process, timeout=60.0
            )
        for opened in await asyncio.gather(*(c.receive() for c in clients)):
            failures.update(opened["failures"])
    held = sum([(await c.ask("mark"))["open"] for c in clients])
    rss_after = proc_status(target.proc.pid)["VmRSS"]
    return {
        "held": held,
        "failures": dict(failures),
        "open_seconds": time.monotonic() - started,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "kb_per_subscriber": (rss_after - rss_before) / max(1, held - sum(live)),
    }


async def shutdown(target: Target, clients: list[LoadClient], timeout: float) -> dict[str, Any]:
    """SIGTERM with every stream open: seconds until the streams end and the process exits."""
    for client in clients:
        client.send("watch_close", timeout=timeout)
    signalled = time.time()
    target.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while target.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # polling for the exit, bounded by the deadline
    exited = time.time() if target.proc.poll() is not None else None
    closes = await asyncio.gather(*(c.receive() for c in clients))
    if exited is None:
        target.proc.kill()
        target.proc.wait()
    last_close = max(c["last_close"] for c in closes)
    return {
        "exit_seconds": None if exited is None else exited - signalled,
        "returncode": target.proc.returncode,
        "streams_closed_seconds": last_close - signalled if last_close else None,
        "still_open": sum(c["still_open"] for c in closes),
        "how": dict(sum((collections.Counter(c["how"]) for c in closes), collections.Counter())),
    }


def log_errors(target: Target) -> list[str]:
    """Lines of the server's log that report an error."""
    lines = target.log.read_text(errors="replace").splitlines()
    return [line for line in lines if " ERROR " in line or "Traceback" in line or " CRITICAL " in line]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import aiohttp  # the driver's own requests; the streams themselves use raw sockets

    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        clients = [await LoadClient.start("sampler", tmp)]
        clients += [await LoadClient.start(f"drainer-{i}", tmp) for i in range(args.client_procs)]

        progress("real: starting server.py")
        real = await start_target(http, "real", tmp, args)
        progress("real, 1 subscriber: job flow")
        await open_streams(real, clients, 1, args)
        out["real_1"] = await job_flow(http, real, clients[:1], args)
        progress(f"real: opening {args.subscribers} streams")
        out["real_open"] = await open_streams(real, clients, args.subscribers, args)
        progress(f"real, {out['real_open']['held']} subscribers: job flow")
        out["real_n"] = await job_flow(http, real, clients, args)
        out["real_n"]["rss_end_kb"] = proc_status(real.proc.pid)["VmRSS"]
        out["real_fanout"] = fanout_cost(out["real_1"], out["real_n"])
        progress("real: SIGTERM with every stream open")
        out["real_shutdown"] = await shutdown(real, clients, args.shutdown_timeout)
        out["real_log_errors"] = log_errors(real)[:20]
        for client in clients:
            await client.ask("forget")

        if not args.no_bare:
            job_file = tmp / "job.json"
            template = out["real_1"]["template"] or out["real_n"]["template"]
            job_file.write_text(template or '{"status": "completed"}')
            progress("bare: starting sse_baseline_app.py")
            bare = await start_target(http, "bare", tmp, args, job_file)
            await open_streams(bare, clients, 1, args)
            out["bare_1"] = await job_flow(http, bare, clients[:1], args)
            progress(f"bare: opening {args.subscribers} streams")
            out["bare_open"] = await open_streams(bare, clients, args.subscribers, args)
            progress(f"bare, {out['bare_open']['held']} subscribers: job flow")
            out["bare_n"] = await job_flow(http, bare, clients, args)
            out["bare_fanout"] = fanout_cost(out["bare_1"], out["bare_n"])
            progress("bare: SIGTERM with every stream open")
            out["bare_shutdown"] = await shutdown(bare, clients, args.shutdown_timeout)
            out["bare_log_errors"] = log_errors(bare)[:20]
    return out


# --- the report ----------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.1f}x"


SCENARIOS = {
    "real_1": "real, 1 sub",
    "real_n": "real, N subs",
    "bare_1": "bare, 1 sub",
    "bare_n": "bare, N subs",
}
# The table's columns: heading and width.
COLUMNS = [
    ("scenario", -13), ("subs", 6), ("events", 6), ("p50 ms", 7), ("p99 ms", 7), ("max ms", 7),
    ("spread p50", 10), ("delivered/s", 11), ("offered/s", 10), ("srv CPU s", 9), ("cut off", 7),
    ("complete", 11), ("gaps/dups", 9),
]  # fmt: skip


def table_row(cells: list[str]) -> str:
    return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True))


def scenario_cells(name: str, s: dict[str, Any]) -> list[str]:
    lat, spread = s["latency_ms"] or {}, s["spread_ms"] or {}
    return [
        name, str(s["subscribers"]), str(s["events"]),
        fmt(lat.get("p50")), fmt(lat.get("p99")), fmt(lat.get("max")), fmt(spread.get("p50")),
        f"{s['deliveries_per_s']:.0f}", f"{s['offered_deliveries_per_s']:.0f}", f"{s['server_cpu_s']:.1f}",
        str(s["closed_by_server"]), f"{s['complete']}/{s['subscribers']}",
        f"{s['gaps'] or 0}/{s['duplicates'] or 0}",
    ]  # fmt: skip


def table(out: dict[str, Any]) -> str:
    """The results as the text the benchmark prints."""
    rows = [table_row([heading for heading, _ in COLUMNS])]
    rows += [table_row(scenario_cells(name, out[key])) for key, name in SCENARIOS.items() if key in out]
    lines = ["", "\n".join(rows), ""]
    real_1, real_n = out["real_1"]["latency_ms"], out["real_n"]["latency_ms"]
    lines.append(
        f"latency, real N subs / real 1 sub: p50 {ratio(real_n['p50'], real_1['p50'])}, "
        f"p99 {ratio(real_n['p99'], real_1['p99'])}"
    )
    if "bare_n" in out:
        bare_n = out["bare_n"]["latency_ms"]
        lines.append(
            f"latency, real / bare at N subs: p50 {ratio(real_n['p50'], bare_n['p50'])}, "
            f"p99 {ratio(real_n['p99'], bare_n['p99'])}"
        )
    for kind in ("real", "bare"):
        if f"{kind}_fanout" not in out:
            continue
        f, n = out[f"{kind}_fanout"], out[f"{kind}_n"]
        share = ""
        if f["capacity_per_s"]:
            share = f" (this run offered {n['offered_deliveries_per_s'] / f['capacity_per_s']:.0%} of that)"
        lines.append(
            f"{kind}: fan-out costs {fmt(f['us_per_delivery'])} us of server CPU per delivery -> at most "
            f"{fmt(f['capacity_per_s'], '.0f')} deliveries/s, {fmt(f['max_events_per_s'], '.1f')} events/s "
            f"to {n['subscribers']} subscribers{share}"
        )
    if "bare_fanout" in out:
        real_us, bare_us = out["real_fanout"]["us_per_delivery"], out["bare_fanout"]["us_per_delivery"]
        lines.append(f"fan-out CPU per delivery, real / bare: {ratio(real_us, bare_us)}")
    for kind in ("real", "bare"):
        if f"{kind}_open" not in out:
            continue
        o, sd = out[f"{kind}_open"], out[f"{kind}_shutdown"]
        fails = f", failed: {o['failures']}" if o["failures"] else ""
        lines.append(
            f"{kind}: held {o['held']} streams (opened in {o['open_seconds']:.1f} s{fails}); "
            f"RSS {o['rss_before_kb'] / 1024:.0f} -> {o['rss_after_kb'] / 1024:.0f} MB = "
            f"{o['kb_per_subscriber']:.1f} KB per subscriber"
        )
        still = f", {sd['still_open']} still open" if sd["still_open"] else ""
        lines.append(
            f"{kind}: SIGTERM with {o['held']} streams open: exited in {fmt(sd['exit_seconds'], '.2f')} s "
            f"(code {sd['returncode']}), every stream ended within "
            f"{fmt(sd['streams_closed_seconds'], '.2f')} s {sd['how']}{still}"
        )
    for key in ("real_1", "real_n"):
        n, posts, post_ms = out[key], out[key]["posts"], out[key]["posts"]["post_latency"]
        late = "" if n["jobs_done_before_deadline"] else " (jobs still running at the deadline)"
        lines.append(
            f"{SCENARIOS[key]}: {posts['jobs']} jobs posted over {posts['send_seconds']:.1f} s, POST p50/p99 "
            f"{fmt(post_ms['p50'])}/{fmt(post_ms['p99'])} ms {posts['statuses']}; "
            f"last event read {n['delivery_seconds']:.1f} s after the first POST{late}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="imagegen SSE benchmark: streams held, fan-out latency, shutdown"
    )
    parser.add_argument("--subscribers", type=int, default=10000, help="streams held open (default 10000)")
    parser.add_argument(
        "--sample", type=int, default=200, help="streams whose events are timed (default 200)"
    )
    parser.add_argument("--rate", type=float, default=0.3, help="jobs created per second (default 0.3)")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of job creation per phase (default 20)"
    )
    parser.add_argument(
        "--images", type=int, default=2, help="images per job (default 2): a job makes images + 3 events"
    )
    parser.add_argument("--workers", type=int, default=4, help="imagegen workers.count (default 4)")
    parser.add_argument(
        "--buffer",
        type=int,
        default=1000,
        help="events.subscriber_buffer, of the service and the bare app (default 1000)",
    )
    parser.add_argument(
        "--client-procs", type=int, default=2, help="load processes that drain streams (default 2)"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=100, help="streams connecting at once (default 100)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the jobs to finish and every stream to read them (default 60)",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds to wait for an exit (default 30)"
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare aiohttp-sse fan-out baseline")
    parser.add_argument(
        "--bare-mode",
        choices=("queue", "direct"),
        default="queue",
        help="the bare fan-out: a task per stream fed by a queue (default), or direct writes",
    )
    parser.add_argument("--load-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops this process
        asyncio.run(load_process_main())
        return 0
    if (
        args.subscribers < 1
        or args.sample < 1
        or args.rate <= 0
        or args.duration <= 0
        or args.client_procs < 1
    ):
        parser.error(
            "--subscribers, --sample, --client-procs must be at least 1; --rate and --duration positive"
        )
    limit = raise_fd_limit()
    if args.subscribers + 100 > limit:
        parser.error(f"--subscribers {args.subscribers} needs more open files than the hard limit {limit}")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child and remove the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="imagegen-sse-bench-") as tmp:
            try:
                out = asyncio.run(run(args, Path(tmp)))
            finally:
                stop_children()
    except KeyboardInterrupt:
        return 130
    print(table(out))
    for kind in ("real", "bare"):
        if out.get(f"{kind}_log_errors"):
            print(f"\n{kind} server logged errors:\n  " + "\n  ".join(out[f"{kind}_log_errors"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for key in ("real_1", "real_n", "bare_1", "bare_n"):
        out.get(key, {}).pop("template", None)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "load_process"} | {"image_size": 64},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "run_seconds": time.monotonic() - started,
        **out,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)} (run took {report['run_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
