"""Tokenizing a request: off the event loop, and text too long for the context refused before it.

No engine runs here: the app gets a stand-in with the synthetic tokenizer and a context length, all that
tokenizing and the context checks use; every request below ends before anything is submitted.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fastdecode.actors.frontend import FrontendConfig, FrontendState, build_app
from fastdecode.actors.frontend.generation import LARGE_RESPONSE_TOKENS, json_response, prompt_token_ids
from fastdecode.actors.frontend.openai_request import GenerateRequest
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.model.synthetic_tokenizer import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    NUM_TEXT_TOKENS,
    build_synthetic_tokenizer,
)
from fastdecode.actors.model.tokenizer import Tokenizer

UNIT = " The capital of France is Paris."  # a leading space: every repeat tokenizes the same way
BIG_TEXT = UNIT * ((1 << 20) // len(UNIT))  # ~1 MiB: about a second of tokenizing, on the loop or not
TICK_S = 0.01


class SpyTokenizer(Tokenizer):
    """The synthetic tokenizer, remembering the length of every text it encodes."""

    def __init__(self) -> None:
        super().__init__(build_synthetic_tokenizer(NUM_TEXT_TOKENS + 2), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                         chat_template=CHAT_TEMPLATE)
        self.encoded_lengths: list[int] = []

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.encoded_lengths.append(len(text))
        return super().encode(text, add_special_tokens=add_special_tokens)


def engine(max_model_len: int) -> SimpleNamespace:
    """What tokenizing needs of an ``AsyncLLM`` (and attaching it to the app: its model's sampling defaults)."""
    return SimpleNamespace(tokenizer=SpyTokenizer(), max_model_len=max_model_len, max_num_choices=8,
                           model_config=SimpleNamespace(sampling_defaults=SamplingDefaults()))


async def max_loop_gap(work) -> tuple[object, float, int, float]:
    """``work``'s result, the longest the loop went between 10 ms ticks while it ran, the tick count and how
    long the work took."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)  # let the ticker start before the work does
    start = time.monotonic()
    try:
        result = await work
    finally:
        ticker.cancel()
    return result, max(gaps, default=float("inf")), len(gaps), time.monotonic() - start


@pytest.mark.parametrize("kind", ["prompt", "messages"])
async def test_a_large_prompt_is_tokenized_off_the_loop(kind):
    llm = engine(max_model_len=1 << 20)  # room for BIG_TEXT, so it really is tokenized
    if kind == "prompt":
        request = GenerateRequest(model=None, prompt=BIG_TEXT)
    else:
        request = GenerateRequest(model=None, messages=({"role": "user", "content": BIG_TEXT},))
    ids, gap, num_ticks, took = await max_loop_gap(prompt_token_ids(llm, request))
    # on the loop, one gap would span the whole tokenizing; a third of it leaves room for a busy machine
    assert gap < took / 3, f"the event loop stalled {gap:.2f} s of the {took:.2f} s of tokenizing"
    assert num_ticks >= 5  # the loop really ran beside the tokenizing
    unit_ids = llm.tokenizer.encode(UNIT, add_special_tokens=False)
    num_units = len(BIG_TEXT) // len(UNIT)
    if kind == "prompt":
        assert ids == [BOS_TOKEN_ID, *unit_ids * num_units]
    else:  # the template around the units, as it tokenizes around two of them
        two = llm.tokenizer.encode_chat([{"role": "user", "content": UNIT * 2}])
        start = next(i for i in range(len(two)) if two[i:i + 2 * len(unit_ids)] == unit_ids * 2)
        assert ids == [*two[:start], *unit_ids * num_units, *two[start + 2 * len(unit_ids):]]


async def test_token_id_prompts_are_not_tokenized():
    llm = engine(max_model_len=4)
    assert await prompt_token_ids(llm, GenerateRequest(model=None, prompt=(5, 6, 7, 8, 9))) == [5, 6, 7, 8, 9]
    assert llm.tokenizer.encoded_lengths == []


MAX_MODEL_LEN = 64


def body_of(kind: str, text: str) -> tuple[str, dict]:
    if kind == "prompt":
        return "/v1/completions", {"prompt": text, "max_tokens": 1}
    half = len(text) // 2  # the limit counts the text of all messages together
    return "/v1/chat/completions", {"messages": [{"role": "system", "content": text[:half]},
                                                 {"role": "user", "content": text[half:]}], "max_tokens": 1}


@pytest.mark.parametrize("kind", ["prompt", "messages"])
async def test_text_longer_than_the_context_can_hold_is_refused_untokenized(kind):
    llm = engine(MAX_MODEL_LEN)
    max_chars = MAX_MODEL_LEN * llm.tokenizer.max_chars_per_token
    assert llm.tokenizer.max_chars_per_token == max(len(t) for t in llm.tokenizer.backend.get_vocab())
    state = FrontendState(FrontendConfig(served_model_name="m"))
    state.llm = llm
    async with TestClient(TestServer(build_app(state))) as client:
        path, body = body_of(kind, "a" * (max_chars + 1))
        response = await client.post(path, json=body)
        error = (await response.json())["error"]
        assert response.status == 400
        assert (error["code"], error["param"]) == ("context_length_exceeded", kind)
        assert "too long for this model's context" in error["message"]
        assert llm.tokenizer.encoded_lengths == []

        # at the limit it is tokenized, and the token count refuses it (one token per "a")
        path, body = body_of(kind, "a" * max_chars)
        response = await client.post(path, json=body)
        error = (await response.json())["error"]
        assert response.status == 400
        assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
        assert len(llm.tokenizer.encoded_lengths) == 1 and llm.tokenizer.encoded_lengths[0] >= max_chars


async def test_the_websocket_refuses_text_too_long_untokenized():
    llm = engine(MAX_MODEL_LEN)
    state = FrontendState(FrontendConfig(served_model_name="m"))
    state.llm = llm
    async with TestClient(TestServer(build_app(state))) as client:
        async with client.ws_connect("/v1/stream") as ws:
            await ws.send_json({"prompt": "a" * (MAX_MODEL_LEN * llm.tokenizer.max_chars_per_token + 1)})
            message = await ws.receive_json(timeout=5)
    assert message["type"] == "error" and message["status"] == 400
    assert "too long for this model's context" in message["message"]
    assert llm.tokenizer.encoded_lengths == []


def test_a_failed_generation_answers_503_when_a_retry_may_succeed():
    from fastdecode.actors.api import StreamOutput
    from fastdecode.actors.frontend.generation import generation_error

    down = generation_error(StreamOutput(1, -1, "", finish_reason="error", error="no KV node is left",
                                         is_retryable=True))
    assert (down.status, down.code, down.message) == (503, "unavailable", "no KV node is left")
    broken = generation_error(StreamOutput(1, -1, "", finish_reason="error", error="internal error"))
    assert (broken.status, broken.message) == (500, "internal error")


def test_refusals_while_the_kv_nodes_drain_or_are_gone_answer_503_with_their_code():
    from fastdecode.actors.executor_config import KVNodesDrainingError, UnavailableError
    from fastdecode.actors.frontend.generation import admission_error

    draining = admission_error(KVNodesDrainingError("the KV nodes left are draining"))
    gone = admission_error(UnavailableError("no KV node is reachable"))
    assert (draining.status, draining.code) == (503, "draining")
    assert (gone.status, gone.code) == (503, "unavailable")


async def test_a_long_tokenization_with_its_token_strings_is_answered_off_the_loop():
    """/tokenize with return_token_strs on about a MiB of text: its quarter-million token strings and the JSON
    around them were built on the loop, after the tokenizing that already ran off it."""
    llm = engine(max_model_len=1 << 20)
    spelled_on: set[threading.Thread] = set()
    token_str = llm.tokenizer.token_str
    llm.tokenizer.token_str = lambda token_id: spelled_on.add(threading.current_thread()) or token_str(token_id)
    state = FrontendState(FrontendConfig(served_model_name="m"))
    state.llm = llm
    async with TestClient(TestServer(build_app(state))) as client:
        async def ask() -> dict:
            response = await client.post("/tokenize", json={"prompt": BIG_TEXT, "return_token_strs": True})
            assert response.status == 200
            return await response.json()

        answer, gap, num_ticks, took = await max_loop_gap(ask())
    assert spelled_on and threading.main_thread() not in spelled_on
    assert gap < took / 3, f"the event loop stalled {gap:.2f} s of the {took:.2f} s"
    assert num_ticks >= 5
    assert answer["count"] == len(answer["tokens"]) == len(answer["token_strs"]) > LARGE_RESPONSE_TOKENS
    assert answer["token_strs"][:3] == [llm.tokenizer.token_str(t) for t in answer["tokens"][:3]]


async def test_json_response_builds_a_small_answer_on_the_loop_and_a_large_one_on_a_worker():
    threads = []

    def build() -> dict:
        threads.append(threading.current_thread())
        return {"ok": [1, 2]}

    for num_tokens in (LARGE_RESPONSE_TOKENS, LARGE_RESPONSE_TOKENS + 1):
        response = await json_response(build, num_tokens=num_tokens)
        assert json.loads(response.text) == {"ok": [1, 2]} and response.content_type == "application/json"
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
