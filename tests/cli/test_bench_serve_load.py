"""fdctl bench serve's load and figures against a fake streaming server (in a thread): every request in flight at
once (no client-side pool of 100), ``--max-concurrency``, inter-token latency, ``--goodput``, and one-line errors
for a bad ``--trace`` CSV."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from click.testing import CliRunner
from fake_openai import FakeOpenAI, serving

from fastdecode.cli.bench import bench
from fastdecode.cli.bench_serve import is_good, read_trace
from fastdecode.cli.errors import OneLineError
from fastdecode.cli.serve import API_KEY_ENV
from one_line_errors import assert_one_line_error

pytestmark = pytest.mark.timeout(30)


class HoldingServer(FakeOpenAI):
    """/v1/models and a streaming /v1/completions that holds each request until ``target`` are in progress at once
    (or ``hold_s`` passed), then streams ``max_tokens`` one-token chunks ``gap_s`` apart; counts the peak of
    requests in progress."""

    def __init__(self, *, target: int, hold_s: float, gap_s: float = 0.0) -> None:
        self.target, self.hold_s, self.gap_s = target, hold_s, gap_s
        self.in_progress = self.peak = self.num_served = 0
        self.reached = asyncio.Event()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.in_progress += 1
        self.peak = max(self.peak, self.in_progress)
        try:
            if self.in_progress >= self.target:
                self.reached.set()
            try:
                await asyncio.wait_for(self.reached.wait(), self.hold_s)
            except asyncio.TimeoutError:
                pass
            response = await self.stream_tokens(request, body, gap_s=self.gap_s)
            self.num_served += 1
            return response
        finally:
            self.in_progress -= 1


def bench_serve(url: str, *args: str):
    args = ["serve", "--url", url, "--rate", "1000000", "--prompt-len", "3", "--vocab", "40", *args]
    return CliRunner().invoke(bench, args, env={API_KEY_ENV: None})


def figures(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_more_than_100_requests_reach_the_server_at_once():
    """aiohttp's default connector holds at most 100 connections: the 101st request waited for a free one, and that
    wait counted as the server's TTFT. 120 arrivals at once must all be in progress together."""
    fake = HoldingServer(target=120, hold_s=3.0)
    with serving(fake) as url:
        out = figures(bench_serve(url, "--num-requests", "120", "--output-len", "2"))
    assert out["num_ok"] == 120 and out["num_errors"] == 0, out["errors"]
    assert fake.peak == 120


def test_max_concurrency_bounds_the_requests_in_flight_and_not_their_ttft():
    """20 arrivals at once, at most 5 in flight; a request's clock starts when it is sent, not while it waits for
    one of the 5 places (each request streams for ~0.2 s, so a waiting one would show a TTFT of 0.2 s or more)."""
    fake = HoldingServer(target=5, hold_s=3.0, gap_s=0.1)
    with serving(fake) as url:
        out = figures(bench_serve(url, "--num-requests", "20", "--output-len", "3", "--max-concurrency", "5"))
    assert out["num_ok"] == 20 and fake.num_served == 20
    assert fake.peak == 5
    assert out["max_concurrency"] == 5
    assert out["ttft_s"]["p99"] < 0.15, out["ttft_s"]


def test_inter_token_latency_is_the_gap_between_chunks():
    fake = HoldingServer(target=1, hold_s=0.0, gap_s=0.05)
    with serving(fake) as url:
        out = figures(bench_serve(url, "--num-requests", "3", "--output-len", "4"))
    assert set(out["itl_s"]) == {"mean", "p50", "p90", "p99"}
    assert 0.045 <= out["itl_s"]["p50"] < 0.5 and out["itl_s"]["mean"] >= 0.045, out["itl_s"]
    assert out["itl_s"]["mean"] == pytest.approx(out["tpot_s"]["mean"], rel=0.05)  # one token per chunk
    assert out["goodput_requests_per_s"] is None  # no --goodput


def test_goodput_counts_the_requests_meeting_every_slo():
    fake = HoldingServer(target=1, hold_s=0.0, gap_s=0.02)
    with serving(fake) as url:
        loose = figures(bench_serve(url, "--num-requests", "4", "--output-len", "3", "--goodput", "ttft:60000",
                                    "--goodput", "tpot:60000 e2el:60000"))
        tight = figures(bench_serve(url, "--num-requests", "4", "--output-len", "3", "--goodput",
                                    "ttft:60000,tpot:1"))
    assert loose["goodput_slo_ms"] == {"ttft": 60000, "tpot": 60000, "e2el": 60000}
    assert loose["goodput_requests_per_s"] == pytest.approx(loose["requests_per_s"]) and loose["num_ok"] == 4
    assert tight["goodput_requests_per_s"] == 0.0 and tight["num_ok"] == 4  # 20 ms per token is past 1 ms


def test_is_good_checks_every_given_slo_in_milliseconds():
    result = {"ttft_s": 0.2, "tpot_s": 0.03, "latency_s": 1.0}
    assert is_good(result, {"ttft": 200, "tpot": 30, "e2el": 1000})  # at the limit is within it, as vLLM
    assert not is_good(result, {"ttft": 199})
    assert not is_good(result, {"tpot": 29})
    assert not is_good(result, {"e2el": 999})
    assert is_good(result, {})
    assert is_good({**result, "tpot_s": None}, {"tpot": 0})  # one token: no TPOT to miss, as vLLM's 0


@pytest.mark.parametrize("value, message", [
    ("ttfx:5", "unknown metric 'ttfx' (ttft, tpot, e2el)"),
    ("ttft:-1", "must be a non-negative number of milliseconds"),
    ("ttft:nan", "must be a non-negative number of milliseconds"),
    ("ttft", 'KEY:VALUE pairs'),
    ("ttft:1 ttft:2", "'ttft' is given twice"),
])
def test_bad_goodput_is_one_line_before_any_request(value, message):
    result = bench_serve("http://127.0.0.1:9", "--goodput", value)  # nothing listens there: no request is made
    line = assert_one_line_error(result, message)
    assert line.startswith("Error: Invalid value for '--goodput'"), line


def test_max_concurrency_must_be_positive():
    result = bench_serve("http://127.0.0.1:9", "--max-concurrency", "0")
    line = assert_one_line_error(result, "Invalid value for '--max-concurrency': 0 is not in the range x>=1")
    assert line.startswith("Error: Invalid value for '--max-concurrency': 0 is not in the range x>=1")


@pytest.mark.parametrize("content, message", [
    (b"timestamp,request tokens,response tokens\n1.0,3\n", "line 2: missing or not numbers"),
    (b"timestamp,request tokens,response tokens\n1.0,3,x\n", "line 2: missing or not numbers"),
    (b"timestamp,request tokens,response tokens\n1.0,inf,2\n", "line 2: missing or not numbers"),
    (b"timestamp,request tokens,response tokens\nnan,3,2\n", "line 2: missing or not numbers"),
    (b"timestamp,request tokens,response tokens\n1.0,3,2\n\xff\xfe,1,1\n", "is not UTF-8 text"),
    (b"timestamp,request tokens,response tokens\n", "has no requests, only its header"),  # max() of nothing
])
def test_bad_trace_rows_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "trace.csv"
    path.write_bytes(content)
    with pytest.raises(OneLineError, match=message) as caught:
        read_trace(str(path), 10)
    assert str(path) in caught.value.message
    result = bench_serve("http://127.0.0.1:9", "--trace", str(path))  # checked before any request
    line = assert_one_line_error(result, message)
    assert line.startswith(f"Error: trace {path}"), line


def test_trace_rows_longer_than_the_header_are_read(tmp_path):
    """The columns came from the first row's keys, where csv puts a long row's extra fields under None."""
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,request tokens,response tokens\n1.0,3,2,extra\n1.5,4,5\n")
    assert read_trace(str(path), 10) == [(0.0, 3, 2), (0.5, 4, 5)]


def test_trace_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_bytes("\ufeffTimestamp,Request tokens,Response tokens\n5.0,3,2\n4.5,7,1\n".encode())
    assert read_trace(str(path), 10) == [(0.0, 7, 1), (0.5, 3, 2)]
