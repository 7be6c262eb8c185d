"""The OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``."""
from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from fastdecode.actors.api import StreamOutput
from fastdecode.actors.frontend.generation import (
    LARGE_RESPONSE_TOKENS,
    Generation,
    generation_error,
    interleaved,
    json_response,
    start_generations,
    total_usage,
)
from fastdecode.actors.frontend.openai_request import GenerateRequest, parse_body, parse_chat, parse_completion
from fastdecode.actors.frontend.openai_response import ResponseBuilder
from fastdecode.actors.frontend.sse import EventStream
from fastdecode.actors.frontend.state import STATE
from fastdecode.actors.tool_parsers import ToolDelta

log = logging.getLogger("fastdecode.frontend")

CREATED_AT = web.AppKey("fastdecode_created_at", int)  # Unix time the app was built: the model card's ``created``


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion, is_chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[STATE].config
    parse = functools.partial(parse_chat, tool_serving=config.tool_serving, reasoning_parser=config.reasoning_parser)
    return await _generate(request, parse, is_chat=True)


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]})


async def model(request: web.Request) -> web.Response:
    """OpenAI's retrieve (``GET /v1/models/{model}``); another id is a 404 as elsewhere."""
    request.app[STATE].check_model(request.match_info["model"])
    return web.json_response(_model_card(request))


def _model_card(request: web.Request) -> dict[str, Any]:
    """The served model's card; 503 ``not_ready`` while the model loads: clients (and benchmark tools) that wait
    for ``/v1/models`` to answer before sending requests, as they may with vLLM, which answers nothing before it
    is ready, would otherwise start while every request still gets a 503."""
    state = request.app[STATE]
    name, created = state.config.served_model_name, request.app[CREATED_AT]
    # vLLM's card: the model's path as root, no parent, one permission object that allows what the server does
    permission = {"id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, f'{name}@{created}').hex}",
                  "object": "model_permission", "created": created, "allow_create_engine": False,
                  "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                  "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}
    return {"id": name, "object": "model", "created": created, "owned_by": "fastdecode",
            "root": state.config.model or name, "parent": None, "max_model_len": state.started_llm().max_model_len,
            "permission": [permission]}


async def _generate(request: web.Request, parse: Callable[[dict[str, Any]], GenerateRequest], *,
                    is_chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    llm = state.require_llm()
    body = (await parse_body(await request.read(), parse)).for_tokenizer(llm.tokenizer)
    state.check_model(body.model)
    builder = ResponseBuilder.new(state.config.served_model_name, is_chat=is_chat, token_text=state.token_text,
                                  token_bytes=state.token_bytes, is_token_id_text=body.is_token_id_text,
                                  num_logprobs=body.num_logprobs, role=state.config.response_role)
    async with start_generations(llm, state.metrics, body, max_num_choices=llm.max_num_choices) as generations:
        if body.is_stream:
            return await _stream(request, body, builder, generations, llm.tokenizer)
        outputs: dict[int, list[StreamOutput]] = {g.index: [] for g in generations}
        async with contextlib.aclosing(interleaved(generations)) as merged:
            async for generation, out in merged:
                if out.finish_reason == "error":
                    raise generation_error(out)  # the other choices are cancelled on the way out
                outputs[generation.index].append(out)
        usage = total_usage(generations)

        def build() -> dict[str, Any]:
            choices = [builder.choice(outputs[g.index], g.finish_reason, stop_reason=g.stop_reason, index=g.index,
                                      echo_text=g.echo_text, prompt_ids=g.prompt_ids,
                                      parsing=body.parsing_for(llm.tokenizer, g.prompt_ids))
                       for g in generations]
            prompt_logprobs = None
            if is_chat:  # vLLM's chat shows them once: its choices share its one prompt
                first = generations[0]
                prompt_logprobs = builder.prompt_logprobs(first.prompt_ids, outputs[first.index][0].prompt_logprobs)
            return builder.complete_choices(choices, usage, prompt_logprobs=prompt_logprobs)

        # prompt tokens count where the response shows them (echo, prompt logprobs)
        shows_prompt = body.is_echo or body.num_prompt_logprobs is not None
        num_tokens = sum(len(outputs[g.index]) + shows_prompt * len(g.prompt_ids) for g in generations)
        return await json_response(build, num_tokens=num_tokens)


async def _stream(request: web.Request, body: GenerateRequest, builder: ResponseBuilder,
                  generations: list[Generation], tokenizer: Any) -> web.StreamResponse:
    """Chunks as tokens come, the choices' interleaved, each with its index; a failed choice (the server shutting
    down included) ends the whole stream with its error event (no usage chunk after it, as vLLM), and every stream
    ends with ``data: [DONE]``.  With echo, a choice's first chunk starts with its prompt's text (vLLM's), and its
    logprobs with the prompt's tokens'.  A chat choice whose text is parsed streams its reasoning, content and tool
    calls as its reader finds them (``choice_text``), and ends as "tool_calls" where an auto or required choice
    called."""
    num_sent = {g.index: 0 for g in generations}  # tokens streamed per choice, for continuous usage
    echo_left = {g.index: g.echo_text for g in generations if g.echo_text is not None}  # prompt not streamed yet
    readers = {g.index: parsing.reader() for g in generations
               if (parsing := body.parsing_for(tokenizer, g.prompt_ids)) is not None}
    events = await EventStream.open(request)
    is_failed = False
    try:
        if builder.is_chat:
            for generation in generations:
                await events.send(_with_usage(builder.role_chunk(generation.index), body, generation, 0))
        async with contextlib.aclosing(interleaved(generations)) as merged:
            async for generation, out in merged:
                if out.finish_reason == "error":
                    await events.send(generation_error(out).body())
                    is_failed = True
                    break
                index = generation.index
                if out.token_id >= 0:
                    num_sent[index] += 1
                tool_delta, finish_reason = None, None
                if readers:
                    reader = readers[index]
                    tool_delta = reader.feed(out.text)
                    if out.finish_reason is not None:
                        tool_delta += reader.finish()
                        finish_reason = "tool_calls" if reader.ends_as_tool_calls else None
                is_shown = bool(out.text) if tool_delta is None else bool(
                    tool_delta.content or tool_delta.calls or tool_delta.reasoning)
                if not is_shown and out.finish_reason is None and not builder.wants_logprobs and index not in echo_left:
                    continue  # half a character, or text a tag or tool call may take: nothing to show yet
                echo_text = echo_left.pop(index, None)
                parts = (builder, body, generation, out, echo_text, num_sent[index], tool_delta, finish_reason)
                # an echo's first chunk shows every prompt token: over many, built off the loop (as json_response)
                if echo_text is not None and len(generation.prompt_ids) > LARGE_RESPONSE_TOKENS:
                    await events.send_built(functools.partial(_stream_chunk, *parts))
                else:
                    await events.send(_stream_chunk(*parts))
        if body.is_usage_streamed and not is_failed:
            await events.send(builder.usage_chunk(total_usage(generations)))
        await events.done()
    except ConnectionResetError:
        log.info("client left during a stream; request cancelled")
    return events.response


def _stream_chunk(builder: ResponseBuilder, body: GenerateRequest, generation: Generation, out: StreamOutput,
                  echo_text: str | None, num_sent: int, tool_delta: ToolDelta | None = None,
                  finish_reason: str | None = None) -> dict[str, Any]:
    """One output's stream chunk, with the usage so far where asked."""
    chunk = builder.chunk(out, index=generation.index, echo_text=echo_text, prompt_ids=generation.prompt_ids,
                          tool_delta=tool_delta, finish_reason=finish_reason)
    return _with_usage(chunk, body, generation, num_sent)


def _with_usage(chunk: dict[str, Any], body: GenerateRequest, generation: Generation,
                num_output_tokens: int) -> dict[str, Any]:
    """vLLM's ``continuous_usage_stats``: every chunk carries its choice's usage so far."""
    if body.is_usage_continuous:
        num_prompt = len(generation.prompt_ids)
        chunk["usage"] = {"prompt_tokens": num_prompt, "completion_tokens": num_output_tokens,
                          "total_tokens": num_prompt + num_output_tokens}
    return chunk
