"""``fdctl bench prefix-cache``: time to first token of prompts that share a long prefix, prefix caching off and on.

In one process, for each setting (off first, then on) it starts the model (``LLM``), sends one prompt of the shared
prefix and a suffix (which fills the cache where it is on), then ``--requests`` more, one at a time, each the prefix
and a suffix of its own, with ``max_tokens=1``: a request's latency is its time to first token, mostly its prefill.
Prompts are token ids drawn from the vocabulary with a fixed seed, the same in both settings. It prints one JSON
object last on stdout: each setting's per-request seconds and median, the cache's hit tokens, and ``speedup``
(the median off over the median on, the reference taken in the same run).
"""
from __future__ import annotations

import json
import statistics
import time

import click

from fastdecode.cli.errors import OneLineCommand, one_line_errors


def timed_prompts(llm, prompts: list[list[int]]) -> list[float]:
    """Seconds of each prompt's one-token request, sent one after another."""
    from fastdecode.actors.request import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seconds = []
    for ids in prompts:
        t0 = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, params, show_progress=False)
        seconds.append(time.perf_counter() - t0)
    return seconds


def setting_figures(is_cached: bool, seconds: list[float], stats) -> dict:
    """One setting's figures: the first prompt's seconds (it fills the cache), then the others'."""
    return {"prefix_caching": is_cached, "first_s": seconds[0], "seconds": seconds[1:],
            "median_s": statistics.median(seconds[1:]), "hit_tokens": stats.hit_tokens if stats else 0}


@click.command("prefix-cache", cls=OneLineCommand)
@click.option("--model", default="smollm2", show_default=True, help="Model name, as fdctl serve's --model.")
@click.option("--prefix-len", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--suffix-len", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--requests", "num_requests", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompts' token ids.")
def prefix_cache_command(model: str, prefix_len: int, suffix_len: int, num_requests: int, dtype: str, device: str,
                         seed: int) -> None:
    """Time to first token of prompts sharing a prefix, prefix caching off and on (JSON)."""
    import numpy as np

    from fastdecode.actors.api import LLM

    with one_line_errors():
        rng = np.random.default_rng(seed)
        prompts: list[list[int]] = []
        settings = []
        for is_cached in (False, True):
            with LLM(model, enable_prefix_caching=is_cached, dtype=dtype, device=device) as llm:
                if not prompts:  # the same token ids in both settings
                    vocab_size = llm.tokenizer.vocab_size
                    prefix = rng.integers(0, vocab_size, prefix_len).tolist()
                    prompts = [prefix + rng.integers(0, vocab_size, suffix_len).tolist()
                               for _ in range(num_requests + 1)]
                settings.append(setting_figures(is_cached, timed_prompts(llm, prompts), llm.prefix_cache_stats))
    off, on = settings
    print(json.dumps({"model": model, "prefix_len": prefix_len, "suffix_len": suffix_len,
                      "num_requests": num_requests, "settings": settings,
                      "speedup": off["median_s"] / on["median_s"]}))
