"""Load and soak: many concurrent streams, or a steady rate for minutes, through ``onecard serve``.

::

    .venv/bin/python -m benchmarks.load --streams 1000                  # 1,000 concurrent streams
    .venv/bin/python -m benchmarks.load --soak-minutes 10 --rate 40     # a 10-minute soak at 40 req/s
    .venv/bin/python -m benchmarks.load --streams 200 --soak-minutes 1  # a quick check of both

The gateway runs as an ``onecard serve`` subprocess (uvloop + httptools, as deployed) in front of two
stand-in engines (``tests.fakes.standin_engine``, paced by ``STANDIN_TOKEN_DELAY`` so that streams
stay open), so its resident memory (RSS) and open file descriptors can be read with psutil.

- ``--streams N``: N streaming completions opened at once, split over the two models, each on its own
  connection; they all overlap (each lasts ``--burst-tokens`` x ``--token-delay`` seconds at least).
  Reported: streams complete and intact, the most open at once, and the gateway's RSS and FDs before,
  at the peak and after (once the client connections are closed).
- ``--soak-minutes M --rate R``: R requests a second, open loop, for M minutes: streams and non-stream
  requests on a pool of keep-alive connections, some on fresh connections, and a few streams the client
  abandons half way (to exercise the cancel path; they are counted apart). RSS and FDs are sampled every
  few seconds; reported: first and last samples, the maximum, and the growth over the second half.

Every answer is checked against the stand-in's deterministic text (:func:`expected_text`): a stream
must be 200, every event valid JSON, no usage chunk the client did not ask for, the text exactly what
the engine generated, and the last event ``data: [DONE]``. Anything else counts as lost or corrupted.
Results go to ``benchmarks/results/load_streams.json`` and ``load_soak.json``. Aims (DESIGN §9): the
gateway stays under 200 MB RSS with 1,000 open streams, and flat over a soak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import psutil

from benchmarks.common import Connection, Processes, free_port, http_json, machine_info, write_results
from tests.fakes.standin_engine import expected_text
from tests.support import standin_executable, standin_model, write_registry

MODELS = ("alpha", "beta")
RSS_AIM_MB = 200.0
MB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_fd_limit(want: int) -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``want`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------------------------------
# One request and its check
# --------------------------------------------------------------------------------------------------


class StreamConnection(Connection):
    """A :class:`Connection` that also says when the response head has arrived (the stream is open)."""

    on_head: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        had_head = bool(self._status)
        waiting = self._waiter is not None
        super().data_received(data)
        if not had_head and waiting and (self._status or self._waiter is None) and self.on_head is not None:
            self.on_head()


def body_of(model: str, prompt: str, max_tokens: int, *, stream: bool) -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
                         "temperature": 0})


def check_stream(status: int, body: bytes, want: str) -> str | None:
    """None when the stream is complete and intact, else what is wrong with it."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    events = [e for e in body.split(b"\n\n") if e]
    if not events or events[-1] != b"data: [DONE]":
        return f"does not end with [DONE]: {body[-200:]!r}"
    text = []
    for ev in events[:-1]:
        if not ev.startswith(b"data: "):
            return f"not a data event: {ev[:100]!r}"
        try:
            chunk = orjson.loads(ev[6:])
        except orjson.JSONDecodeError:
            return f"event is not JSON: {ev[:100]!r}"
        if "error" in chunk:
            return f"error event: {chunk['error']}"
        if not chunk.get("choices"):
            return "a usage chunk the client did not ask for"
        text.append(chunk["choices"][0].get("text") or "")
    got = "".join(text)
    return None if got == want else f"text differs: {got[:60]!r} != {want[:60]!r}"


def check_plain(status: int, body: bytes, want: str) -> str | None:
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    try:
        got = orjson.loads(body)["choices"][0]["text"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return f"unreadable answer: {body[:200]!r}"
    return None if got == want else f"text differs: {got[:60]!r} != {want[:60]!r}"


# --------------------------------------------------------------------------------------------------
# The gateway's process: RSS and FDs
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the phase began
    rss_mb: float
    fds: int
    open_streams: int = 0


def sample(proc: psutil.Process, t0: float, open_streams: int = 0) -> Sample:
    return Sample(round(time.monotonic() - t0, 2), round(proc.memory_info().rss / MB, 1), proc.num_fds(),
                  open_streams)


async def settle(base: str, proc: psutil.Process, seconds: float = 3.0) -> Sample:
    """Wait until the gateway has nothing in flight, then a little more, and sample it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = (await asyncio.to_thread(http_json, f"{base}/admin/engines"))["engines"]
        if all(r["in_flight"] == 0 for r in rows):
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(seconds)
    return sample(proc, time.monotonic())


# --------------------------------------------------------------------------------------------------
# 1. N concurrent streams
# --------------------------------------------------------------------------------------------------


@dataclass
class BurstResult:
    streams: int
    tokens_per_stream: int
    complete: int
    failed: int
    failures: list[str]
    max_open_at_once: int
    seconds: float
    connect_errors: int
    rss_mb: dict[str, float]
    fds: dict[str, int]
    samples: list[dict[str, Any]]


async def burst(host: str, port: int, proc: psutil.Process, *, n: int, tokens: int) -> BurstResult:
    base = f"http://{host}:{port}"
    before = await settle(base, proc)
    log(f"burst: before: gateway RSS {before.rss_mb} MB, {before.fds} FDs; opening {n} streams")
    t0 = time.monotonic()
    opened = 0
    done = 0
    samples: list[Sample] = []
    peak = before

    def on_head() -> None:
        nonlocal opened
        opened += 1

    async def sampler() -> None:
        nonlocal peak
        while True:
            s = sample(proc, t0, opened - done)
            samples.append(s)
            if s.rss_mb > peak.rss_mb or s.open_streams > peak.open_streams:
                peak = Sample(s.t, max(s.rss_mb, peak.rss_mb), max(s.fds, peak.fds),
                              max(s.open_streams, peak.open_streams))
            await asyncio.sleep(0.25)

    conns: list[StreamConnection] = []
    connect_errors = 0

    async def one(i: int) -> str | None:
        nonlocal done, connect_errors
        model = MODELS[i % len(MODELS)]
        prompt = f"burst stream {i}"
        try:
            conn = cast(StreamConnection, await StreamConnection.open(host, port))
        except OSError as e:
            connect_errors += 1
            return f"connect: {e}"
        conn.on_head = on_head
        conns.append(conn)
        try:
            resp = await asyncio.wait_for(
                conn.request(b"POST", b"/v1/completions", body_of(model, prompt, tokens, stream=True)), 600)
        except (OSError, TimeoutError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        finally:
            done += 1
        return check_stream(resp.status, resp.body, expected_text(model, prompt, tokens))

    task = asyncio.create_task(sampler())
    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    seconds = time.monotonic() - t0
    held = sample(proc, t0)
    for c in conns:
        c.close()
    after = await settle(base, proc)
    await asyncio.sleep(35)  # past the upstream keep-alive expiry (30 s)
    idle = sample(proc, t0)
    failures = [r for r in results if r is not None]
    log(f"burst: {n - len(failures)}/{n} complete in {seconds:.1f} s; peak {peak.open_streams} open, "
        f"RSS {peak.rss_mb} MB, {peak.fds} FDs; after: RSS {after.rss_mb} MB, {after.fds} FDs")
    return BurstResult(
        streams=n, tokens_per_stream=tokens, complete=n - len(failures), failed=len(failures),
        failures=failures[:20], max_open_at_once=peak.open_streams, seconds=round(seconds, 2),
        connect_errors=connect_errors,
        rss_mb={"before": before.rss_mb, "peak": peak.rss_mb, "all_done_connections_open": held.rss_mb,
                "after": after.rss_mb, "after_35s_idle": idle.rss_mb},
        fds={"before": before.fds, "peak": peak.fds, "all_done_connections_open": held.fds, "after": after.fds,
             "after_35s_idle": idle.fds},
        samples=[asdict(s) for s in samples[:: max(1, len(samples) // 200)]],
    )


# --------------------------------------------------------------------------------------------------
# 2. A steady rate for minutes
# --------------------------------------------------------------------------------------------------


@dataclass
class SoakCounts:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    aborted: int = 0  # abandoned by the client on purpose
    streams: int = 0
    plain: int = 0
    fresh_connections: int = 0
    failures: list[str] = field(default_factory=list)


class Pool:
    """Idle keep-alive connections to the gateway, most recently used first."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.all: list[Connection] = []

    async def get(self) -> Connection:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                return c
        c = await Connection.open(self.host, self.port)
        self.all.append(c)
        return c

    def put(self, c: Connection) -> None:
        if not c.closed:
            self.idle.append(c)

    def close(self) -> None:
        for c in self.all:
            c.close()


async def soak(host: str, port: int, proc: psutil.Process, *, minutes: float, rate: float, tokens: int,
               seed: int) -> dict[str, Any]:
    base = f"http://{host}:{port}"
    rng = random.Random(seed)
    counts = SoakCounts()
    pool = Pool(host, port)
    before = await settle(base, proc)
    log(f"soak: before: gateway RSS {before.rss_mb} MB, {before.fds} FDs; {rate:g} req/s for {minutes:g} min")
    t0 = time.monotonic()
    samples: list[Sample] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        model = MODELS[i % len(MODELS)]
        prompt = f"soak {i} {rng.random():.6f}"
        n_tokens = rng.randint(1, tokens)
        roll = rng.random()
        stream = roll < 0.75
        abort = stream and roll < 0.02
        fresh = rng.random() < 0.1
        counts.sent += 1
        counts.streams += stream
        counts.plain += not stream
        counts.fresh_connections += fresh
        try:
            conn = await (Connection.open(host, port) if fresh else pool.get())
        except OSError as e:
            counts.failed += 1
            counts.failures.append(f"connect: {e}")
            return
        try:
            req = conn.request(b"POST", b"/v1/completions", body_of(model, prompt, n_tokens, stream=stream))
            if abort:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(req, 0.3)
                conn.close()
                counts.aborted += 1
                return
            resp = await asyncio.wait_for(req, 120)
        except (OSError, TimeoutError, ValueError) as e:
            conn.close()
            counts.failed += 1
            counts.failures.append(f"{type(e).__name__}: {e}")
            return
        want = expected_text(model, prompt, n_tokens)
        problem = (check_stream if stream else check_plain)(resp.status, resp.body, want)
        if problem is None:
            counts.ok += 1
        else:
            counts.failed += 1
            counts.failures.append(problem)
        if fresh:
            conn.close()
        else:
            pool.put(conn)

    async def sampler() -> None:
        while True:
            samples.append(sample(proc, t0, len(in_flight)))
            await asyncio.sleep(5.0)

    sampling = asyncio.create_task(sampler())
    end = t0 + minutes * 60
    i = 0
    lag_max = 0.0
    try:
        while True:
            due = t0 + i / rate
            if due >= end:
                break
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                lag_max = max(lag_max, now - due)
            task = asyncio.create_task(one(i))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
            if i % int(max(1, rate * 60)) == 0:
                s = samples[-1] if samples else before
                log(f"soak: {(time.monotonic() - t0) / 60:.1f} min, {counts.sent} sent, {counts.ok} ok, "
                    f"{counts.failed} failed; RSS {s.rss_mb} MB, {s.fds} FDs")
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=180)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    seconds = time.monotonic() - t0
    samples.append(sample(proc, t0))
    pool.close()
    after = await settle(base, proc)
    half = [s for s in samples if s.t >= seconds / 2] or samples
    growth = half[-1].rss_mb - half[0].rss_mb
    first = samples[1] if len(samples) > 1 else samples[0]  # 5 s in: past the first allocations
    log(f"soak: {counts.ok}/{counts.sent} ok, {counts.failed} failed, {counts.aborted} aborted on purpose, "
        f"in {seconds:.0f} s; RSS {first.rss_mb} -> {samples[-1].rss_mb} MB (second half {growth:+.1f} MB), "
        f"FDs {first.fds} -> {after.fds}")
    return {
        "minutes": minutes, "rate_per_s": rate, "achieved_rate_per_s": round(counts.sent / seconds, 2),
        "max_tokens": tokens, "seconds": round(seconds, 1), "max_send_lag_s": round(lag_max, 3),
        "counts": {k: v for k, v in asdict(counts).items() if k != "failures"},
        "failures": counts.failures[:20],
        "rss_mb": {"before": before.rss_mb, "first_sample": first.rss_mb, "last_sample": samples[-1].rss_mb,
                   "max": max(s.rss_mb for s in samples), "second_half_growth": round(growth, 1),
                   "after": after.rss_mb},
        "fds": {"before": before.fds, "first_sample": first.fds, "max": max(s.fds for s in samples),
                "after": after.fds},
        "samples": [asdict(s) for s in samples],
    }


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


async def warm_up(host: str, port: int) -> None:
    """A few streams per model: the gateway's pools, caches and metrics children exist before 'before'."""
    async def one(i: int) -> None:
        model = MODELS[i % len(MODELS)]
        conn = await Connection.open(host, port)
        try:
            resp = await conn.request(b"POST", b"/v1/completions", body_of(model, f"warm {i}", 4, stream=True))
            problem = check_stream(resp.status, resp.body, expected_text(model, f"warm {i}", 4))
            if problem:
                raise RuntimeError(f"warm-up failed: {problem}")
        finally:
            conn.close()

    await asyncio.gather(*(one(i) for i in range(32)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=0, help="open this many streams at once (e.g. 1000)")
    ap.add_argument("--bursts", type=int, default=2,
                    help="open the N streams this many times, one burst after the other (default 2: a second "
                         "burst that does not raise the peak shows a high-water mark, not a leak)")
    ap.add_argument("--burst-tokens", type=int, default=20, help="tokens per burst stream (default 20)")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="run a soak this long (e.g. 10)")
    ap.add_argument("--rate", type=float, default=40.0, help="soak requests per second (default 40)")
    ap.add_argument("--soak-tokens", type=int, default=32, help="soak max_tokens, drawn 1..N (default 32)")
    ap.add_argument("--token-delay", type=float, default=0.25,
                    help="stand-in seconds between tokens for the burst (default 0.25: streams stay open)")
    ap.add_argument("--soak-token-delay", type=float, default=0.02, help="... for the soak (default 0.02)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if not args.streams and not args.soak_minutes:
        ap.error("give --streams N and/or --soak-minutes M")
    limit = raise_fd_limit(max(4096, 4 * args.streams + 1024))
    log(f"file descriptor limit {limit[0]} (hard {limit[1]})")
    run: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):  # uvloop comes with uvicorn[standard]
        import uvloop
        run = uvloop.run
    status = 0
    phases = [("streams", args.token_delay)] if args.streams else []
    phases += [("soak", args.soak_token_delay)] if args.soak_minutes else []
    for phase, delay in phases:
        with tempfile.TemporaryDirectory(prefix="onecard-load-") as tmp, Processes(Path(tmp)) as procs:
            folder = Path(tmp)
            models = [standin_model(m, env={"STANDIN_TOKEN_DELAY": str(delay)}) for m in MODELS]
            registry = write_registry(folder / "registry.yaml", models, executable=standin_executable(folder),
                                      budget_gib=2.5, scheduler={"max_queue": 4096})
            port = free_port()
            gw = procs.gateway(registry, port, folder / "run", cpus=None, log_level="warning")
            base = f"http://127.0.0.1:{port}"
            for m in MODELS:
                http_json(f"{base}/admin/engines/{m}/load", "POST")
            rows = http_json(f"{base}/admin/engines")["engines"]
            procs.extra_pids += [int(r["pid"]) for r in rows if r["pid"]]
            proc = psutil.Process(gw.pid)
            log(f"{phase}: gateway pid {gw.pid} on :{port}; engines {[(r['model'], r['pid']) for r in rows]}")
            t = time.monotonic()
            try:
                run(warm_up("127.0.0.1", port))
                if phase == "streams":
                    bursts = [asdict(run(burst("127.0.0.1", port, proc, n=args.streams, tokens=args.burst_tokens)))
                              for _ in range(args.bursts)]
                    res = {**bursts[0], "repeats": [
                        {k: b[k] for k in ("complete", "failed", "failures", "max_open_at_once", "seconds", "rss_mb",
                                           "fds")} for b in bursts[1:]]}
                    ok = all(b["failed"] == 0 and b["rss_mb"]["peak"] < RSS_AIM_MB for b in bursts)
                    command = f"python -m benchmarks.load --streams {args.streams}"
                else:
                    res = run(soak("127.0.0.1", port, proc, minutes=args.soak_minutes, rate=args.rate,
                                   tokens=args.soak_tokens, seed=args.seed))
                    ok = res["counts"]["failed"] == 0 and res["rss_mb"]["max"] < RSS_AIM_MB
                    command = f"python -m benchmarks.load --soak-minutes {args.soak_minutes:g} --rate {args.rate:g}"
            except Exception:
                print(gw.log_tail(60), file=sys.stderr)
                raise
            gateway_log = gw.log_tail(40)
        out = {
            "benchmark": f"load_{phase}", "command": command, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.monotonic() - t, 1), "machine": machine_info(),
            "load_average": list(os.getloadavg()), "token_delay_s": delay, "fd_limit": limit[0],
            "rss_aim_mb": RSS_AIM_MB, "meets_aims": ok, **res,
            "gateway_log_tail": [ln for ln in gateway_log.splitlines() if "WARNING" in ln or "ERROR" in ln][-20:],
        }
        path = write_results(f"load_{phase}", out)
        print(summary(phase, out))
        print(f"results in {path}")
        status |= 0 if ok else 1
    return status


def summary(phase: str, out: dict[str, Any]) -> str:
    rss, fds = out["rss_mb"], out["fds"]
    if phase == "streams":
        return (f"{out['complete']}/{out['streams']} streams complete and intact ({out['failed']} lost or "
                f"corrupted), at most {out['max_open_at_once']} open at once, {out['seconds']} s\n"
                f"gateway RSS MB: before {rss['before']}, peak {rss['peak']}, after {rss['after']}, "
                f"35 s later {rss['after_35s_idle']}  (aim < {RSS_AIM_MB:g})\n"
                f"gateway FDs:    before {fds['before']}, peak {fds['peak']}, after {fds['after']}, "
                f"35 s later {fds['after_35s_idle']}"
                + "".join(f"\nburst {i}: {r['complete']}/{out['streams']} complete, RSS peak {r['rss_mb']['peak']} "
                          f"after {r['rss_mb']['after']} MB; FDs peak {r['fds']['peak']} after {r['fds']['after']}, "
                          f"35 s later {r['fds']['after_35s_idle']}" for i, r in enumerate(out["repeats"], 2)))
    c = out["counts"]
    return (f"{c['ok']}/{c['sent'] - c['aborted']} answers intact ({c['failed']} lost or corrupted, {c['aborted']} "
            f"abandoned on purpose), {out['achieved_rate_per_s']} req/s for {out['seconds']} s\n"
            f"gateway RSS MB: before {rss['before']}, first {rss['first_sample']}, last {rss['last_sample']}, "
            f"max {rss['max']}, second-half growth {rss['second_half_growth']:+}, after {rss['after']}\n"
            f"gateway FDs:    before {fds['before']}, first {fds['first_sample']}, max {fds['max']}, "
            f"after {fds['after']}")


if __name__ == "__main__":
    sys.exit(main())
