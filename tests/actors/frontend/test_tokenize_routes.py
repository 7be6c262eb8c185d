"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on a live server: the model's own tokenizer's ids in vLLM's
response shapes, the API key, and 400/404 for bad input."""
from __future__ import annotations

import aiohttp
import pytest

from conftest import API_KEY, MAX_MODEL_LEN

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def post(url: str, path: str, body, headers=AUTH) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        kwargs = {"data": body} if isinstance(body, str) else {"json": body}
        async with session.post(url + path, headers=headers, **kwargs) as response:
            return response.status, await response.json()


async def test_tokenize_prompt_gives_the_model_tokenizer_ids(tiny_server, tiny_model):
    tokenizer = tiny_model[1]
    status, body = await post(tiny_server.url, "/tokenize", {"model": "tiny", "prompt": PROMPT})
    assert status == 200, body
    assert body == {"count": len(tokenizer.encode(PROMPT)), "max_model_len": MAX_MODEL_LEN,
                    "tokens": tokenizer.encode(PROMPT), "token_strs": None}
    assert body["tokens"][0] == tokenizer.bos_token_id  # add_special_tokens defaults to true for a prompt
    status, body = await post(tiny_server.url, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False,
                                                              "return_token_strs": True})
    assert status == 200, body
    assert body["tokens"] == tokenizer.encode(PROMPT, add_special_tokens=False)
    assert body["token_strs"] == [tokenizer.backend.id_to_token(t) for t in body["tokens"]]
    assert "".join(body["token_strs"]).replace("Ġ", " ") == PROMPT


async def test_tokenize_chat_renders_the_chat_template(tiny_server, tiny_model):
    tokenizer = tiny_model[1]
    status, body = await post(tiny_server.url, "/tokenize", {"model": "tiny", "messages": MESSAGES})
    assert status == 200, body
    assert body["tokens"] == tokenizer.encode_chat(MESSAGES) and body["count"] == len(body["tokens"])
    status, bare = await post(tiny_server.url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert status == 200, bare
    assert bare["tokens"] == tokenizer.encode_chat(MESSAGES, add_generation_prompt=False) != body["tokens"]
    status, extra = await post(tiny_server.url, "/tokenize", {"messages": MESSAGES, "add_special_tokens": True})
    assert status == 200, extra
    assert extra["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))  # one BOS: already there


async def test_detokenize_gives_back_the_text(tiny_server, tiny_model):
    tokenizer = tiny_model[1]
    ids = tokenizer.encode(PROMPT)
    status, body = await post(tiny_server.url, "/detokenize", {"model": "tiny", "tokens": ids})
    assert status == 200, body
    assert body == {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
    assert body["prompt"].endswith(PROMPT) and body["prompt"] != PROMPT  # the BOS text is kept, as vLLM does
    assert await post(tiny_server.url, "/detokenize", {"tokens": []}) == (200, {"prompt": ""})


async def test_tokenized_ids_are_a_valid_completions_prompt(tiny_server):
    """What ``fdctl bench serve`` does: ids from /tokenize sent back as a prompt of token ids."""
    status, body = await post(tiny_server.url, "/tokenize", {"prompt": PROMPT})
    status, completion = await post(tiny_server.url, "/v1/completions",
                                    {"prompt": body["tokens"], "max_tokens": 2, "temperature": 0})
    assert status == 200, completion
    assert completion["usage"]["prompt_tokens"] == body["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "other", "prompt": PROMPT}, 404, "model"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ("/tokenize", {"prompt": [1, 2]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, 400, None),
    ("/tokenize", {"prompt": PROMPT, "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", "{not json", 400, None),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, 2.5]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, 10**30]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
])
async def test_bad_requests_get_openai_errors(tiny_server, path, body, status, param):
    got_status, got = await post(tiny_server.url, path, body)
    assert got_status == status, got
    assert got["error"]["param"] == param and got["error"]["type"] == "invalid_request_error", got


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1]})])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
async def test_the_api_key_is_needed(tiny_server, path, body, headers):
    status, got = await post(tiny_server.url, path, body, headers=headers)
    assert status == 401 and got["error"]["code"] == "invalid_api_key", got
