"""The prompt's logprobs over HTTP on a live ``fdctl serve`` (random:tiny): lm-evaluation-harness's loglikelihood
request (completions' ``echo: true, logprobs: 1, max_tokens: 0``) scores the prompt's tokens as the model's full
forward pass does, whole or streamed; vLLM's ``prompt_logprobs`` field, on completions' choices and on a chat
response, and refused on a stream."""
from __future__ import annotations

import json

import aiohttp
import pytest
import torch

from conftest import API_KEY
from fastdecode.actors.api import StreamOutput
from fastdecode.actors.frontend.openai_response import ResponseBuilder
from fastdecode.actors.model import TorchKVCache
from fastdecode.actors.model.synthetic_tokenizer import BOS_TOKEN, BOS_TOKEN_ID
from fastdecode.actors.reference import run_tokens
from fastdecode.actors.request import PromptLogprob

SENTENCE = "The capital of France is Paris, and the capital of Italy is Rome."
ATOL = 1e-4  # the server's batched prefill sums in another order than the reference's
MESSAGES = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(scope="module")
def prompt_ids(tiny_model) -> list[int]:
    """A prompt of token ids without special tokens, so that its tokens' texts make its text."""
    return tiny_model[1].encode(SENTENCE, add_special_tokens=False)


@torch.no_grad()
def reference_logprobs(model, prompt_ids: list[int]) -> torch.Tensor:
    """log_softmax of the whole prompt's forward pass ``[T, vocab]``: row i scores token i + 1."""
    cache = TorchKVCache.for_model(model)
    cache.allocate(0)
    return model.logits(run_tokens(model, cache, 0, prompt_ids, 0)).log_softmax(dim=-1)


async def post(server, route: str, body: dict) -> tuple[int, dict | list[dict]]:
    """The status and JSON body of a request, or the chunks of a stream."""
    body = {"model": "tiny", "temperature": 0, "ignore_eos": True, **body}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        async with session.post(server.url + route, json=body) as response:
            if not body.get("stream") or response.status != 200:
                return response.status, await response.json()
            events = (await response.read()).decode().split("\n\n")
    return 200, [json.loads(event[len("data: "):]) for event in events if event and event != "data: [DONE]"]


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]


def offsets_of(tokens: list[str]) -> list[int]:
    starts, position = [], 0
    for token in tokens:
        starts.append(position)
        position += len(token)
    return starts


async def test_lm_eval_loglikelihood_request_scores_the_prompt(tiny_server, tiny_model, prompt_ids):
    model, tokenizer = tiny_model
    status, response = await post(tiny_server, "/v1/completions",
                                  {"prompt": prompt_ids, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert status == 200, response
    (choice,) = response["choices"]
    logprobs = choice["logprobs"]
    assert choice["text"] == SENTENCE and choice["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 0
    assert logprobs["tokens"] == token_texts(tokenizer, prompt_ids) and "".join(logprobs["tokens"]) == SENTENCE
    assert logprobs["text_offset"] == offsets_of(logprobs["tokens"])
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    ref = reference_logprobs(model, prompt_ids)
    expected = [float(ref[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=ATOL)
    for position, top in enumerate(logprobs["top_logprobs"][1:], start=1):
        # the prompt token itself, then the most likely one (one entry where that is the prompt token)
        token = logprobs["tokens"][position]
        assert top[token] == pytest.approx(expected[position - 1], abs=ATOL)
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(float(ref[position - 1].max()), abs=ATOL)
    # vLLM's choice also carries the prompt logprobs the echo asked for
    assert len(choice["prompt_logprobs"]) == len(prompt_ids) and choice["prompt_logprobs"][0] is None


def test_echoed_tokens_are_named_as_generated_ones_and_show_at_most_logprobs_top(tiny_model, prompt_ids):
    """return_tokens_as_token_ids names the echoed tokens too; with prompt_logprobs 2 and logprobs 1 an echoed
    token's top shows one; -inf shows as -9999 in both shapes."""
    tokenizer = tiny_model[1]
    a, b, c = prompt_ids[:3]
    prompt_logprobs = (None, PromptLogprob(-0.5, 2, ((c, -0.1), (b, -0.5))),
                       PromptLogprob(float("-inf"), 320, ((a, -0.2), (b, -1.0))))
    made = ResponseBuilder.new("m", is_chat=False, is_token_id_text=True, num_logprobs=1,
                               token_text=lambda t: tokenizer.decode([t], skip_special_tokens=False))
    out = StreamOutput(1, a, "x", -0.3, ((a, -0.3),), "length", prompt_logprobs=prompt_logprobs)
    choice = made.choice([out], "length", echo_text="abc", prompt_ids=[a, b, c])
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in (a, b, c, a)]
    assert logprobs["token_logprobs"] == [None, -0.5, -9999.0, -0.3]
    assert logprobs["top_logprobs"] == [None, {f"token_id:{b}": -0.5, f"token_id:{c}": -0.1},
                                        {f"token_id:{c}": -9999.0, f"token_id:{a}": -0.2}, {f"token_id:{a}": -0.3}]

    def entry(token_id, logprob, rank):
        return {"logprob": logprob, "rank": rank, "decoded_token": tokenizer.decode([token_id],
                                                                                    skip_special_tokens=False)}

    assert choice["prompt_logprobs"] == [
        None, {str(b): entry(b, -0.5, 2), str(c): entry(c, -0.1, 1)},
        {str(c): entry(c, -9999.0, 320), str(a): entry(a, -0.2, 1), str(b): entry(b, -1.0, 2)}]


async def test_echo_with_generation_covers_the_prompt_then_the_output(tiny_server, tiny_model, prompt_ids):
    tokenizer = tiny_model[1]
    status, response = await post(tiny_server, "/v1/completions",
                                  {"prompt": prompt_ids, "echo": True, "logprobs": 2, "max_tokens": 3})
    assert status == 200, response
    (choice,) = response["choices"]
    logprobs, num_prompt = choice["logprobs"], len(prompt_ids)
    assert len(logprobs["tokens"]) == num_prompt + 3 and "".join(logprobs["tokens"]) == choice["text"]
    assert choice["text"].startswith(SENTENCE) and logprobs["text_offset"] == offsets_of(logprobs["tokens"])
    assert logprobs["tokens"][:num_prompt] == token_texts(tokenizer, prompt_ids)
    assert [top is None for top in logprobs["top_logprobs"]] == [True] + [False] * (num_prompt + 2)
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"][1:])
    # streamed: the first chunk echoes the prompt with its logprobs, the others go on where it ended
    status, chunks = await post(tiny_server, "/v1/completions", {"prompt": prompt_ids, "echo": True, "logprobs": 2,
                                                                 "max_tokens": 3, "stream": True})
    assert status == 200
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(streamed[0]["tokens"]) == num_prompt + 1
    for field in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
        assert [item for part in streamed for item in part[field]] == logprobs[field], field
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]


async def test_streamed_echo_without_generation_is_one_chunk_with_the_prompts_logprobs(tiny_server, prompt_ids):
    status, chunks = await post(tiny_server, "/v1/completions", {"prompt": prompt_ids, "echo": True, "logprobs": 1,
                                                                 "max_tokens": 0, "stream": True})
    assert status == 200
    ((choice,),) = [c["choices"] for c in chunks]
    assert (choice["text"], choice["finish_reason"]) == (SENTENCE, "length")
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids) and choice["logprobs"]["token_logprobs"][0] is None


def check_prompt_logprobs(shown: list, prompt_ids: list[int], tiny_model, num_top: int) -> None:
    """vLLM's shape: None first, then {token id: {logprob, rank, decoded_token}} of the prompt token and the top."""
    model, tokenizer = tiny_model
    ref = reference_logprobs(model, prompt_ids)
    assert len(shown) == len(prompt_ids) and shown[0] is None
    for position in range(1, len(prompt_ids)):
        entries, row, token_id = shown[position], ref[position - 1], prompt_ids[position]
        assert num_top <= len(entries) <= num_top + 1 and next(iter(entries)) == str(token_id)
        for key, entry in entries.items():
            assert set(entry) == {"logprob", "rank", "decoded_token"}
            assert entry["logprob"] == pytest.approx(float(row[int(key)]), abs=ATOL)
            assert entry["decoded_token"] == tokenizer.decode([int(key)], skip_special_tokens=False)
        best = sorted((e["rank"], e["logprob"]) for e in entries.values() if e["rank"] <= num_top)
        assert [rank for rank, _ in best] == list(range(1, num_top + 1))
        assert [lp for _, lp in best] == pytest.approx(row.topk(num_top).values.tolist(), abs=ATOL)
        # 1 + the tokens more likely than it (those within the tolerance of it may go either way)
        rank = entries[str(token_id)]["rank"]
        assert int((row > row[token_id] + ATOL).sum()) < rank <= int((row > row[token_id] - ATOL).sum()) + 1


async def test_prompt_logprobs_field_on_completions_choices(tiny_server, tiny_model, prompt_ids):
    status, response = await post(tiny_server, "/v1/completions",
                                  {"prompt": [prompt_ids, prompt_ids[:5]], "prompt_logprobs": 2, "max_tokens": 2})
    assert status == 200, response
    first, second = response["choices"]
    assert first["logprobs"] is None  # no logprobs asked: only the prompt's
    check_prompt_logprobs(first["prompt_logprobs"], prompt_ids, tiny_model, 2)
    check_prompt_logprobs(second["prompt_logprobs"], prompt_ids[:5], tiny_model, 2)
    status, plain = await post(tiny_server, "/v1/completions", {"prompt": prompt_ids, "max_tokens": 2})
    assert plain["choices"][0]["prompt_logprobs"] is None


async def test_prompt_logprobs_field_on_a_chat_response(tiny_server, tiny_model):
    status, response = await post(tiny_server, "/v1/chat/completions",
                                  {"messages": MESSAGES, "prompt_logprobs": 1, "max_tokens": 2, "n": 2})
    assert status == 200, response
    assert all("prompt_logprobs" not in choice for choice in response["choices"])  # vLLM's: once, on the response
    ids = tiny_model[1].encode_chat(MESSAGES, add_generation_prompt=True)
    check_prompt_logprobs(response["prompt_logprobs"], ids, tiny_model, 1)


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "Hello"}),
                                         ("/v1/chat/completions", {"messages": MESSAGES})], ids=["completions", "chat"])
async def test_prompt_logprobs_on_a_stream_are_refused(tiny_server, route, body):
    status, response = await post(tiny_server, route, {**body, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and response["error"]["param"] == "prompt_logprobs"
    assert "stream" in response["error"]["message"]


async def test_an_echoed_special_token_is_in_the_text_its_offsets_index(tiny_server, tiny_model, prompt_ids):
    """A token-id prompt starting with BOS (lm-eval's prefix token for an empty context): the echoed text kept
    the tokens but dropped the special one, so text_offset pointed past the text."""
    ids = [BOS_TOKEN_ID, *prompt_ids[:4]]
    status, response = await post(tiny_server, "/v1/completions",
                                  {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert status == 200, response
    choice = response["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == "".join(logprobs["tokens"]) and choice["text"].startswith(BOS_TOKEN)
    assert [choice["text"][offset:] for offset in logprobs["text_offset"]][-1] == logprobs["tokens"][-1]


def test_a_shared_token_text_shows_the_best_tokens_logprob(tiny_model):
    """Byte tokens all show as U+FFFD: the sampled token and a better one shared a key that kept the sampled
    one's value, and lm-eval's is_greedy (the token's logprob is the top's maximum) came out true."""
    sampled, best = 5, 6
    made = ResponseBuilder.new("m", is_chat=False, num_logprobs=1, token_text=lambda t: "\ufffd")
    out = StreamOutput(1, sampled, "\ufffd", -2.8, ((best, -2.3),), "length")
    choice = made.choice([out], "length")
    assert choice["logprobs"]["top_logprobs"] == [{"\ufffd": -2.3}]
    assert choice["logprobs"]["token_logprobs"] == [-2.8]
