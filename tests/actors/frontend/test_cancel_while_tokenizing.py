"""A request cancelled while its prompt is tokenized (off the loop, before anything is submitted) counts as one
``abort`` per choice, as one cancelled later does: the WebSocket, the streamed and the plain HTTP routes alike.
It used to count nothing: 5 WebSocket clients closing at once showed 1 abort.  No engine: a stand-in whose
tokenizer holds a marked prompt until the test lets it go."""
from __future__ import annotations

import asyncio
import threading

import pytest

from app_client import ScriptedLLM, app_client
from fastdecode.actors.frontend.generation import start_generations
from fastdecode.actors.frontend.metrics import FINISH_REASONS, FrontendMetrics
from fastdecode.actors.frontend.openai_request import GenerateRequest
from fastdecode.actors.frontend.state import STATE
from fastdecode.actors.model.synthetic_tokenizer import BOS_TOKEN, EOS_TOKEN, NUM_TEXT_TOKENS, build_synthetic_tokenizer
from fastdecode.actors.model.tokenizer import Tokenizer
from metrics_scrape import samples_of

HELD = "Hold this prompt"  # the text the tokenizer holds on
THREAD_WAIT_S = 10.0  # the longest a held tokenizing waits (the test lets it go long before)


class HoldingTokenizer(Tokenizer):
    """The synthetic tokenizer; encoding a text with ``HELD`` in it sets ``is_held`` and waits for ``release``."""

    def __init__(self) -> None:
        super().__init__(build_synthetic_tokenizer(NUM_TEXT_TOKENS + 2), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
        self.is_held, self.release = threading.Event(), threading.Event()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if HELD in text:
            self.is_held.set()
            self.release.wait(THREAD_WAIT_S)
        return super().encode(text, add_special_tokens=add_special_tokens)


@pytest.fixture
async def llm():
    """A ScriptedLLM (it records every submission's seed in ``seeds``) with a HoldingTokenizer; let go at the end
    (before the loop closes, which waits for the tokenizer's thread)."""
    engine = ScriptedLLM()
    engine.tokenizer = HoldingTokenizer()
    yield engine
    engine.tokenizer.release.set()


def finished(samples: dict) -> dict[str, float]:
    return {reason: samples[("fastdecode_request_success_total", (("finished_reason", reason),))]
            for reason in FINISH_REASONS}


async def held(llm: ScriptedLLM) -> None:
    """Wait until the tokenizer holds the marked prompt."""
    assert await asyncio.to_thread(llm.tokenizer.is_held.wait, THREAD_WAIT_S), "the prompt was never tokenized"


async def settled(llm: ScriptedLLM, metrics: FrontendMetrics) -> dict:
    """Let the held tokenizing go and give its thread time to finish: it must count nothing more nor submit."""
    llm.tokenizer.release.set()
    await asyncio.sleep(0.1)
    assert llm.seeds == []  # nothing was submitted
    return await samples_of(metrics, is_model_name_kept=False)


@pytest.mark.parametrize(("prompts", "num_samples", "num_tokenized"), [
    ((HELD,), 1, 0),
    ((HELD,), 2, 0),
    (("Paris", HELD), 1, 1),  # a batch: its first prompt was tokenized, its second is held
], ids=["one", "n=2", "batch"])
async def test_a_request_cancelled_while_its_prompt_is_tokenized_counts_each_choice_as_one_abort(
        llm, prompts, num_samples, num_tokenized):
    metrics = FrontendMetrics("m")
    request = GenerateRequest(model=None, max_tokens=9, num_samples=num_samples,
                              **({"prompt": prompts[0]} if len(prompts) == 1 else {"prompts": prompts}))

    async def client() -> None:
        async with start_generations(llm, metrics, request):
            pytest.fail("the request was submitted")

    task = asyncio.create_task(client())
    await held(llm)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    num_choices = len(prompts) * num_samples
    at_cancel = await samples_of(metrics, is_model_name_kept=False)
    assert finished(at_cancel) == {"stop": 0, "length": 0, "abort": num_choices, "error": 0}
    samples = await settled(llm, metrics)
    assert finished(samples) == {"stop": 0, "length": 0, "abort": num_choices, "error": 0}  # counted once
    assert samples[("fastdecode_e2e_request_latency_seconds_count", ())] == num_choices
    assert samples[("fastdecode_request_generation_tokens_sum", ())] == 0
    assert samples[("fastdecode_prompt_tokens_total", ())] == 0  # none was prefilled
    # a prompt's token count is observed where it is known (tokenized), never as a made-up 0
    assert samples[("fastdecode_request_prompt_tokens_count", ())] == num_tokenized
    assert samples[("fastdecode_request_prompt_tokens_sum", ())] == num_tokenized * len(llm.tokenizer.encode("Paris"))
    assert samples[("fastdecode_request_params_max_tokens_count", ())] == num_tokenized
    assert samples[("fastdecode_request_params_n_count", ())] == 0  # no prompt was admitted


async def leave_websocket(client, llm: ScriptedLLM, body: dict) -> None:
    """Send the request and close at once (the client that closes right after sending)."""
    async with client.ws_connect("/v1/stream") as ws:
        await ws.send_json(body)
        await held(llm)


async def leave_http(client, llm: ScriptedLLM, body: dict) -> None:
    """Post the request and drop the connection while it is tokenized."""
    posting = asyncio.create_task(client.post("/v1/completions", json=body))
    await held(llm)
    posting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await posting


@pytest.mark.parametrize(("leave", "is_stream"), [(leave_websocket, False), (leave_http, False), (leave_http, True)],
                         ids=["websocket", "completions", "completions-stream"])
async def test_a_client_that_leaves_while_its_prompt_is_tokenized_counts_one_abort(llm, leave, is_stream):
    async with app_client(llm) as client:
        metrics = client.server.app[STATE].metrics
        await leave(client, llm, {"prompt": HELD, "max_tokens": 200, "ignore_eos": True, "stream": is_stream})
        for _ in range(250):  # the server notices the client leave and cancels its handler
            if finished(await samples_of(metrics, is_model_name_kept=False))["abort"]:
                break
            await asyncio.sleep(0.02)
        samples = await settled(llm, metrics)
    assert finished(samples) == {"stop": 0, "length": 0, "abort": 1, "error": 0}
    assert not [k for k, v in samples.items() if k[0] == "fastdecode_request_rejected_total" and v]
