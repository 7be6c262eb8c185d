"""``fdctl bench serve``: an open-loop load against a running server's ``/v1/completions``.

Arrivals are Poisson at ``--rate`` requests/s, or follow a BurstGPT-style CSV
(``--trace``: columns ``timestamp``, ``request tokens``, ``response tokens``;
timestamps in seconds, shifted to start at 0). Each request streams (SSE) a prompt
of token ids with ``max_tokens`` and ``ignore_eos``: slices of the ids that the
server's ``POST /tokenize`` (vLLM's shape) gives for a seeded random text, so they
are valid for any model; ids drawn from ``[0, --vocab)`` instead when ``--vocab``
is given or the server has no ``/tokenize``. Every request is sent when it arrives
(no client-side connection pool limit), or with ``--max-concurrency N`` (vLLM's)
when one of N places is free; a request's clock starts when it is sent. TTFT is the
time to the first content chunk, TPOT = (last - first chunk) / (completion tokens - 1),
the completion tokens coming from the streamed usage, ITL the gaps between content
chunks (all requests' together). ``--goodput 'ttft:500 tpot:50 e2el:2000'`` (vLLM's
service level objectives in milliseconds; quoted, or the option repeated) adds
``goodput_requests_per_s``: requests meeting every given objective per second. ``--api-key`` (or ``FASTDECODE_API_KEY``,
as for ``fdctl serve``) is sent as a Bearer key on every request. Progress on stderr;
one JSON object last on stdout, also when no request succeeded (then one ``Error:``
line and exit 1); with ``--out`` also ``latency.png``.
"""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import random
import string
import time
from collections.abc import Callable

import click

from fastdecode.cli.bench import percentiles
from fastdecode.cli.bench_plot import line_plots
from fastdecode.cli.errors import OneLineCommand, OneLineError
from fastdecode.cli.serve import API_KEY_ENV


def read_trace(path: str, limit: int) -> list[tuple[float, int, int]]:
    """(arrival s from the first, prompt tokens, output tokens) from a BurstGPT-style CSV (UTF-8, a byte order
    mark allowed)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except OSError as exc:
        raise OneLineError(f"cannot read trace {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise OneLineError(f"trace {path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise OneLineError(f"trace {path} is not a CSV file: {exc}") from None
    columns = {name.strip().lower(): name for name in reader.fieldnames or ()}
    missing = [c for c in ("timestamp", "request tokens", "response tokens") if c not in columns]
    if missing:
        raise OneLineError(f"trace {path} lacks column(s) {', '.join(missing)} (has {', '.join(columns) or 'none'})")
    out = []
    for number, row in enumerate(rows[:limit], start=2):
        try:  # a short row gives None (TypeError); inf tokens an OverflowError
            timestamp = float(row[columns["timestamp"]])
            if not math.isfinite(timestamp):
                raise ValueError(timestamp)
            out.append((timestamp, int(float(row[columns["request tokens"]])),
                        int(float(row[columns["response tokens"]]))))
        except (ValueError, TypeError, OverflowError):
            raise OneLineError(f"trace {path} line {number}: missing or not numbers: {row}") from None
    if not out:
        raise OneLineError(f"trace {path} has no requests, only its header")
    start = min(t for t, _, _ in out)
    return sorted((t - start, max(1, p), max(1, o)) for t, p, o in out)


def poisson_schedule(rate: float, count: int, prompt_len: int, output_len: int,
                     rng: random.Random) -> list[tuple[float, int, int]]:
    clock, out = 0.0, []
    for _ in range(count):
        out.append((clock, prompt_len, output_len))
        clock += rng.expovariate(rate)
    return out


GOODPUT_METRICS = {"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "latency_s"}  # vLLM's names: a result's keys


def parse_goodput(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    """``--goodput`` values, each one or more KEY:VALUE pairs (space- or comma-separated), as {metric: ms}."""
    slo_ms: dict[str, float] = {}
    for pair in " ".join(values).replace(",", " ").split():
        key, is_pair, value = pair.partition(":")
        if not is_pair:
            raise click.BadParameter(f"{pair!r}: give service level objectives as KEY:VALUE pairs, the value in "
                                     "milliseconds, e.g. ttft:500 tpot:50")
        if key not in GOODPUT_METRICS:
            raise click.BadParameter(f"unknown metric {key!r} ({', '.join(GOODPUT_METRICS)})")
        if key in slo_ms:
            raise click.BadParameter(f"{key!r} is given twice")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms >= 0):
            raise click.BadParameter(f"{pair!r}: {key} must be a non-negative number of milliseconds")
        slo_ms[key] = ms
    return slo_ms


def is_good(result: dict, slo_ms: dict[str, float]) -> bool:
    """Whether a finished request meets every service level objective of ``slo_ms`` (a request of one token has no
    TPOT to miss, as in vLLM)."""
    return all(result[GOODPUT_METRICS[key]] is None or result[GOODPUT_METRICS[key]] <= ms / 1e3
               for key, ms in slo_ms.items())


def http_error(status: int, body: str) -> str:
    """``HTTP <status>: <message>``, the message from an OpenAI-shaped error body, else the body's start."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200]
    return f"HTTP {status}: {message}"


DEFAULT_VOCAB = 1000  # prompt ids come from [0, DEFAULT_VOCAB) when the server has no /tokenize
MIN_TEXT_WORDS, MAX_TEXT_WORDS = 16, 4096  # the random text that /tokenize turns into prompt ids


def random_text(num_words: int, rng: random.Random) -> str:
    """Words of 2 to 8 random lowercase letters: many distinct tokens in any tokenizer."""
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(num_words))


def id_slicer(token_ids: list[int], rng: random.Random) -> Callable[[int], list[int]]:
    """Prompts of n ids: a run of ``token_ids`` from a random start, wrapping round at the end."""
    def prompt(num_ids: int) -> list[int]:
        start = rng.randrange(len(token_ids))
        return [token_ids[(start + i) % len(token_ids)] for i in range(num_ids)]
    return prompt


async def tokenized_ids(session, url: str, model: str, num_words: int, rng: random.Random) -> list[int] | None:
    """The ids ``POST /tokenize`` gives for a random text of ``num_words`` words; None when the server has no
    /tokenize (404).  A 400 (text too long for the server) is retried with a quarter of the words."""
    import aiohttp

    while True:
        body = {"model": model, "prompt": random_text(num_words, rng), "add_special_tokens": False}
        try:
            async with session.post(f"{url}/tokenize", json=body) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise OneLineError(f"cannot tokenize at {url}: {type(exc).__name__}: {exc}") from None
        if status == 404:
            return None
        if status == 400 and num_words > MIN_TEXT_WORDS:
            num_words = max(MIN_TEXT_WORDS, num_words // 4)
            continue
        if status != 200:
            raise OneLineError(f"cannot tokenize at {url}: {http_error(status, text)}")
        try:
            token_ids = json.loads(text)["tokens"]
        except (ValueError, KeyError, TypeError):
            raise OneLineError(f"cannot tokenize at {url}: not a /tokenize reply: {text[:200]}") from None
        if not isinstance(token_ids, list) or not token_ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise OneLineError(f"cannot tokenize at {url}: no token ids in the reply: {text[:200]}")
        return token_ids


async def prompt_maker(session, url: str, model: str, vocab: int | None, max_prompt_len: int,
                       rng: random.Random) -> tuple[Callable[[int], list[int]], str]:
    """(prompt of n token ids, where the ids come from): slices of /tokenize's ids unless ``vocab`` is given
    or the server has no /tokenize, then random ids in [0, vocab)."""
    if vocab is None:
        num_words = min(max(4 * MIN_TEXT_WORDS, max_prompt_len), MAX_TEXT_WORDS)
        token_ids = await tokenized_ids(session, url, model, num_words, rng)
        if token_ids is not None:
            return id_slicer(token_ids, rng), f"/tokenize ({len(token_ids)} ids)"
        vocab = DEFAULT_VOCAB
        click.echo(f"{url} has no /tokenize (HTTP 404): prompt token ids are drawn from [0, {vocab}), which may "
                   "not suit this model; give --vocab to change that", err=True)
    return (lambda num_ids: [rng.randrange(vocab) for _ in range(num_ids)]), f"[0, {vocab})"


async def one_request(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    itl: list[float] = []  # the gaps between content chunks
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            return {"error": http_error(response.status, await response.text())}
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                return {"error": str(chunk["error"])[:200]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") is not None for choice in chunk.get("choices", ())):
                now = time.perf_counter()
                if last is not None:
                    itl.append(now - last)
                last = now
                first = first or last
    if first is None:
        return {"error": "no tokens streamed"}
    return {"ttft_s": first - start, "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens, "latency_s": last - start, "itl_s": itl}


async def run_serve_bench(options: dict) -> dict:
    import aiohttp
    from tqdm import tqdm

    rng = random.Random(options["seed"])
    if options["trace"]:
        schedule = read_trace(options["trace"], options["num_requests"])
    else:
        schedule = poisson_schedule(options["rate"], options["num_requests"], options["prompt_len"],
                                    options["output_len"], rng)
    url = options["url"].rstrip("/")
    timeout = aiohttp.ClientTimeout(total=options["timeout"])
    headers = {"Authorization": f"Bearer {options['api_key']}"} if options["api_key"] else None
    max_concurrency = options["max_concurrency"]
    # aiohttp's default connector holds at most 100 connections: a request past them would wait in the client, and
    # the wait would count as the server's latency (vLLM's benchmark_serving sets the same limits)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector) as session:
        try:
            async with session.get(f"{url}/v1/models") as response:
                status, body = response.status, await response.text()
        except aiohttp.ClientError as exc:
            raise OneLineError(f"cannot list models at {url}: {exc}") from None
        if status != 200:
            raise OneLineError(f"cannot list models at {url}: {http_error(status, body)}")
        try:
            model = json.loads(body)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise OneLineError(f"cannot list models at {url}: not a model list: {body[:200]}") from None
        make_prompt, prompt_ids = await prompt_maker(session, url, model, options["vocab"],
                                                     max(p for _, p, _ in schedule), rng)
        bar = tqdm(total=len(schedule), desc="requests", unit="req", mininterval=0.5)
        results: list[dict] = []
        places = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

        async def fire(at: float, prompt_len: int, output_len: int) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - origin)))
            prompt = make_prompt(prompt_len)
            async with places:  # the request's clock starts once it has a place
                try:
                    results.append(await one_request(session, url, model, prompt, output_len))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    results.append({"error": f"{type(exc).__name__}: {exc}"})
            bar.update(1)

        origin = time.perf_counter()
        await asyncio.gather(*(fire(*item) for item in schedule))
        wall = time.perf_counter() - origin
        bar.close()
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    slo_ms = options["goodput"]
    summary = {"url": url, "model": model, "num_requests": len(schedule), "num_ok": len(done),
               "num_errors": len(errors), "errors": sorted(set(errors))[:5],
               "first_error": errors[0] if errors else None, "prompt_ids": prompt_ids,
               "rate": None if options["trace"] else options["rate"], "trace": options["trace"],
               "max_concurrency": max_concurrency, "wall_s": wall,
               "tokens_per_s": sum(r["tokens"] for r in done) / wall, "requests_per_s": len(done) / wall,
               "goodput_slo_ms": slo_ms,
               "goodput_requests_per_s": sum(is_good(r, slo_ms) for r in done) / wall if slo_ms else None,
               "ttft_s": percentiles([r["ttft_s"] for r in done]),
               "tpot_s": percentiles([r["tpot_s"] for r in done if r["tpot_s"] is not None]),
               "itl_s": percentiles([gap for r in done for gap in r["itl_s"]]),
               "latency_s": percentiles([r["latency_s"] for r in done])}
    if options["out"]:
        ordered = lambda key: [(i / max(1, len(done) - 1), v) for i, v in  # noqa: E731
                               enumerate(sorted(r[key] for r in done if r[key] is not None))]
        summary["plot"] = line_plots(os.path.join(options["out"], "latency.png"),
                                     f"{model} at {url}: {len(done)} requests in {wall:.1f} s", [
            {"xlabel": "fraction of requests", "ylabel": "seconds", "series": {"TTFT": ordered("ttft_s")}},
            {"xlabel": "fraction of requests", "ylabel": "seconds per token", "series": {"TPOT": ordered("tpot_s")}},
        ])
    return summary


@click.command("serve", cls=OneLineCommand)
@click.option("--url", required=True, help="Server base URL, e.g. http://127.0.0.1:8000.")
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True,
              help="Bearer key sent on every request, if the server needs one.")
@click.option("--rate", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Poisson arrival rate, requests/s (ignored with --trace).")
@click.option("--num-requests", default=100, show_default=True, type=click.IntRange(1))
@click.option("--trace", default=None, help="BurstGPT-style CSV: timestamp, request tokens, response tokens.")
@click.option("--max-concurrency", default=None, type=click.IntRange(1),
              help="Most requests in flight at once (vLLM's); an arrival past them waits for a place, its clock "
                   "starting when it is sent. [default: no limit]")
@click.option("--goodput", multiple=True, callback=parse_goodput, metavar="KEY:MS",
              help="Service level objectives, vLLM's: ttft, tpot, e2el (end-to-end latency) in milliseconds, e.g. "
                   "--goodput 'ttft:500 tpot:50' (repeatable); goodput_requests_per_s counts the requests meeting "
                   "every one.")
@click.option("--prompt-len", default=512, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--vocab", default=None, type=click.IntRange(2),
              help="Draw prompt token ids from [0, vocab) (default: slices of the ids the server's /tokenize "
                   f"gives for a random text; [0, {DEFAULT_VOCAB}) if it has no /tokenize).")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Per request, seconds.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, help="Folder for latency.png.")
def serve_command(**options) -> None:
    """Poisson (or trace) load on a running server; TTFT/TPOT/ITL percentiles, tokens/s and goodput."""
    result = asyncio.run(run_serve_bench(options))
    click.echo(json.dumps(result))
    if result["num_ok"] == 0:
        message = f"all {result['num_errors']} requests failed; the first: {result['first_error']}"
        raise click.ClickException(" ".join(message.split()))
