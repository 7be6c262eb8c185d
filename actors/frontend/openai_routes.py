"""The OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from fastdecode.actors.frontend.generation import Generation, generation_error, start_generation
from fastdecode.actors.frontend.openai_request import GenerateRequest, decode_body, parse_chat, parse_completion
from fastdecode.actors.frontend.openai_response import ResponseBuilder
from fastdecode.actors.frontend.sse import EventStream
from fastdecode.actors.frontend.state import STATE

log = logging.getLogger("fastdecode.frontend")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion, is_chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat, is_chat=True)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card: dict[str, Any] = {"id": state.config.served_model_name, "object": "model", "created": 0,
                            "owned_by": "fastdecode"}
    if state.llm is not None:
        card["max_model_len"] = state.llm.max_model_len
    return web.json_response({"object": "list", "data": [card]})


async def _generate(request: web.Request, parse: Callable[[dict[str, Any]], GenerateRequest], *,
                    is_chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    llm = state.require_llm()
    body = parse(decode_body(await request.read()))
    state.check_model(body.model)
    builder = ResponseBuilder.new(state.config.served_model_name, is_chat=is_chat, token_text=state.token_text,
                                  token_bytes=state.token_bytes, is_token_id_text=body.is_token_id_text)
    async with start_generation(llm, state.metrics, body) as generation:
        if body.is_stream:
            return await _stream(request, body, builder, generation)
        outputs = [out async for out in generation.outputs()]
        if generation.finish_reason == "error":
            raise generation_error(outputs[-1])
        return web.json_response(builder.complete(outputs, generation.finish_reason, generation.usage(),
                                                  wants_logprobs=body.num_logprobs is not None,
                                                  stop_reason=generation.stop_reason))


async def _stream(request: web.Request, body: GenerateRequest, builder: ResponseBuilder,
                  generation: Generation) -> web.StreamResponse:
    """Chunks as tokens come; a failed request (the server shutting down included) ends with its error event,
    and every stream ends with ``data: [DONE]``."""
    wants_logprobs = body.num_logprobs is not None
    is_offset_needed = wants_logprobs and not builder.is_chat
    text_offset = 0  # of the next token's text, for completions' logprobs
    events = await EventStream.open(request)
    try:
        if builder.is_chat:
            await events.send(_with_usage(builder.role_chunk(), body, generation))
        async for out in generation.outputs():
            if out.finish_reason == "error":
                await events.send(generation_error(out).body())
                break
            if not out.text and out.finish_reason is None and not wants_logprobs:
                continue  # half a character: nothing to show yet
            chunk = builder.chunk(out, wants_logprobs=wants_logprobs, text_offset=text_offset,
                                  stop_reason=generation.stop_reason)
            await events.send(_with_usage(chunk, body, generation))
            if is_offset_needed and out.token_id >= 0:
                text_offset += len(builder.token_text(out.token_id))
        if body.is_usage_streamed:
            await events.send(builder.usage_chunk(generation.usage()))
        await events.done()
    except ConnectionResetError:
        log.info("client left during a stream; request cancelled")
    return events.response


def _with_usage(chunk: dict[str, Any], body: GenerateRequest, generation: Generation) -> dict[str, Any]:
    """vLLM's ``continuous_usage_stats``: every chunk carries the usage so far."""
    if body.is_usage_continuous:
        chunk["usage"] = generation.usage()
    return chunk
