"""vLLM's tokenizer routes: ``POST /tokenize`` and ``POST /detokenize``, in vLLM's shapes.

``/tokenize`` takes ``{model?, prompt, add_special_tokens=true, return_token_strs=false}`` or the chat form
``{model?, messages, add_generation_prompt=true, add_special_tokens=false, chat_template_kwargs={},
return_token_strs=false}`` (rendered with the model's chat template as a chat completion renders it) and answers
``{count, max_model_len, tokens, token_strs}`` (``token_strs`` is null unless asked for). Like vLLM it tokenizes
text of any length (``count`` may pass ``max_model_len``).
``/detokenize`` takes ``{model?, tokens}`` and answers ``{prompt}`` (special tokens kept, as vLLM does).
Tokenizing runs on a worker thread, as the completions route does. Unlike vLLM, whose key guards ``/v1``
paths only, both routes need the API key when the server has one (middleware.PROTECTED_PATHS).
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.frontend.errors import bad_request
from fastdecode.actors.frontend.generation import chat_token_ids, json_response
from fastdecode.actors.frontend.body_fields import boolean_field, is_int, shown
from fastdecode.actors.frontend.openai_request import (
    checked_text,
    model_field,
    parse_body,
    parse_messages,
    template_variables,
)
from fastdecode.actors.frontend.tool_fields import tools_field
from fastdecode.actors.frontend.state import STATE
from fastdecode.actors.model.tokenizer import Tokenizer

# vLLM chat-tokenize fields this server does not implement -> the values that change nothing
TOKENIZE_UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "mm_processor_kwargs": (None, {}),
}


async def tokenize(request: web.Request) -> web.Response:
    llm, body = await _checked_body(request)
    tokenizer = llm.tokenizer
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise bad_request("give exactly one of prompt and messages")
        token_ids = await _tokenize_chat(tokenizer, body)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string (or give messages)", "prompt")
        checked_text(prompt, "prompt")
        add_special_tokens = boolean_field(body, "add_special_tokens", default=True)
        token_ids = await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens=add_special_tokens)
    is_with_strs = boolean_field(body, "return_token_strs")

    def build() -> dict[str, Any]:
        token_strs = [tokenizer.token_str(token_id) for token_id in token_ids] if is_with_strs else None
        return {"count": len(token_ids), "max_model_len": llm.max_model_len, "tokens": token_ids,
                "token_strs": token_strs}

    return await json_response(build, num_tokens=len(token_ids))


async def detokenize(request: web.Request) -> web.Response:
    llm, body = await _checked_body(request)
    tokenizer = llm.tokenizer
    token_ids = body.get("tokens")
    if not isinstance(token_ids, list) or not all(is_int(t) for t in token_ids):
        raise bad_request("tokens must be a list of integers", "tokens")
    outside = next((t for t in token_ids if not 0 <= t < tokenizer.vocab_size), None)
    if outside is not None:
        raise bad_request(f"token id {shown(outside)} is outside the vocabulary [0, {tokenizer.vocab_size})", "tokens")
    text = await asyncio.to_thread(tokenizer.decode, token_ids, skip_special_tokens=False)
    return web.json_response({"prompt": text})


async def _tokenize_chat(tokenizer: Tokenizer, body: dict[str, Any]) -> list[int]:
    """The chat's ids as a chat completion of the same messages, template variables (``tools`` among them, as
    vLLM's chat tokenize request takes them) and ``add_special_tokens`` tokenizes its prompt."""
    for name, harmless in TOKENIZE_UNSUPPORTED_FIELDS.items():
        if body.get(name) not in harmless:
            raise bad_request(f"{name} is not supported", name)
    return await chat_token_ids(tokenizer, parse_messages(body["messages"]),
                                add_generation_prompt=boolean_field(body, "add_generation_prompt", default=True),
                                add_special_tokens=boolean_field(body, "add_special_tokens", default=False),
                                template_kwargs=template_variables(body, tools_field(body)))


async def _checked_body(request: web.Request) -> tuple[AsyncLLM, dict[str, Any]]:
    """The engine and the request's JSON object, once the key (401), readiness (503) and model (404) pass."""
    state = request.app[STATE]
    llm = state.require_llm()
    body = await parse_body(await request.read(), lambda decoded: decoded)
    state.check_model(model_field(body))
    return llm, body

