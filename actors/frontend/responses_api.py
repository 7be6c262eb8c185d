"""``POST /v1/responses``: OpenAI's Responses API over the chat route's engine path, as vLLM serves it.

The request becomes a chat request (``responses_request``); its one choice's text is read as the chat route reads
it (``choice_text``: a reasoning model's thinking, then the tool calls the request asks for) into output items in
the order the text writes them: a ``reasoning`` item, a ``message`` with one ``output_text`` part (text after a call
is another message), a ``function_call`` item per call. The whole response and the stream build the items the same
way (``_ItemWriter``, one token's pieces at a time). A response cut by ``max_output_tokens`` is ``incomplete``
(reason ``max_output_tokens``), and so is its last item. Streamed, the API's events come as
the text does: ``response.created``, ``response.in_progress``, then per item ``response.output_item.added``, its
deltas (``response.reasoning_text.delta``, ``response.output_text.delta``,
``response.function_call_arguments.delta``) and ``...done`` events, and ``response.completed`` (or
``response.incomplete``) with the whole response; each event has its ``sequence_number``. No response is kept
(``store`` is taken and changes nothing).
"""
from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from fastdecode.actors.frontend.choice_text import ChoiceParsing
from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.generation import Generation, generation_error, json_response, start_generations
from fastdecode.actors.frontend.openai_request import GenerateRequest, parse_body, parse_chat
from fastdecode.actors.frontend.responses_request import chat_body_of
from fastdecode.actors.frontend.sse import EventStream
from fastdecode.actors.frontend.state import STATE
from fastdecode.actors.tool_parsers import ToolDelta


async def responses(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    llm = state.require_llm()
    raw = await parse_body(await request.read(), lambda decoded: decoded)
    config = state.config
    with responses_fields():
        body = parse_chat(chat_body_of(raw), tool_serving=config.tool_serving,
                          reasoning_parser=config.reasoning_parser).for_tokenizer(llm.tokenizer)
    state.check_model(body.model)
    shape = ResponseShape(raw, state.config.served_model_name)
    with responses_fields():
        async with start_generations(llm, state.metrics, body) as generations:
            (generation,) = generations
            if body.is_stream:
                return await _stream(request, body, shape, generation, llm.tokenizer)
            writer = _ItemWriter(None)  # the stream's items, no events sent: both modes show the same items
            await _write_all(writer, body, generation, llm.tokenizer)
            return await json_response(lambda: shape.response(writer.items, generation, writer.num_reasoning_tokens),
                                       num_tokens=generation.num_output_tokens)


# the chat request's fields named in an error as the Responses request names them
RESPONSES_PARAMS = {"response_format": "text.format", "max_completion_tokens": "max_output_tokens",
                    "max_tokens": "max_output_tokens", "prompt": "input", "messages": "input"}


@contextlib.contextmanager
def responses_fields() -> Iterator[None]:
    """An ApiError raised inside names the Responses request's field, not the chat request's it was checked as."""
    try:
        yield
    except ApiError as exc:
        if exc.param is not None:
            head, dot, rest = exc.param.partition(".")
            exc.param = RESPONSES_PARAMS.get(exc.param) or (RESPONSES_PARAMS.get(head, head) + dot + rest)
        raise


class ResponseShape:
    """What every event of one response repeats, and its items and envelope."""

    def __init__(self, raw: dict[str, Any], model: str) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.raw = raw

    def response(self, items: list[dict[str, Any]], generation: Generation | None, num_reasoning_tokens: int = 0,
                 status: str | None = None) -> dict[str, Any]:
        """The Response object; ``status`` from the generation's end where not given ("in_progress" before). No
        response is kept, so ``store`` is false, as vLLM's without its store."""
        if status is None:
            status = "incomplete" if generation is not None and generation.finish_reason == "length" else "completed"
        usage = None
        if generation is not None:
            num_in, num_out = len(generation.prompt_ids), generation.num_output_tokens
            usage = {"input_tokens": num_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": num_out,
                     "output_tokens_details": {"reasoning_tokens": num_reasoning_tokens},
                     "total_tokens": num_in + num_out}
        raw = self.raw
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": raw.get("instructions"), "max_output_tokens": raw.get("max_output_tokens"),
            "model": self.model, "output": items, "parallel_tool_calls": raw.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False, "temperature": raw.get("temperature", 1.0),
            "text": raw.get("text") or {"format": {"type": "text"}}, "tool_choice": raw.get("tool_choice", "auto"),
            "tools": raw.get("tools") or [], "top_p": raw.get("top_p", 1.0), "truncation": "disabled", "usage": usage,
            "user": raw.get("user"), "metadata": raw.get("metadata") or {},
        }


def reasoning_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    content = [] if status == "in_progress" else [_text_part(text)]
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": content}


def call_item(call_id: str, name: str, arguments: str, item_id: str | None = None,
              status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _ItemWriter:
    """The items a choice's deltas make, in the order they come (at most one item open at a time), and the stream's
    events for them, numbered (``events`` None: none sent, for a whole response)."""

    def __init__(self, events: EventStream | None) -> None:
        self.events = events
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being written: its kind, id, text (a call's: more)
        self.num_reasoning_tokens = 0  # output tokens whose text went to the thinking

    async def send(self, kind: str, **fields: Any) -> None:
        if self.events is not None:
            await self.events.send_event(kind, {"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1

    async def write(self, delta: ToolDelta) -> None:
        if delta.reasoning:
            await self._text("reasoning", delta.reasoning)
        if delta.content:
            await self._text("message", delta.content)
        for part in delta.calls:
            if "id" in part:  # a call's first delta: a new item
                await self.close()
                item_id = f"fc_{uuid.uuid4().hex}"
                self.open = {"kind": "function_call", "id": item_id, "text": "", "call_id": part["id"],
                             "name": part["function"]["name"]}
                await self.send("response.output_item.added", output_index=len(self.items),
                                item=call_item(part["id"], part["function"]["name"], "", item_id, "in_progress"))
            if part["function"]["arguments"] and self.open is not None:
                self.open["text"] += part["function"]["arguments"]
                await self.send("response.function_call_arguments.delta", item_id=self.open["id"],
                                output_index=len(self.items), delta=part["function"]["arguments"])

    async def _text(self, kind: str, text: str) -> None:
        await self.begin(kind)
        assert self.open is not None
        self.open["text"] += text
        event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        await self.send(event, item_id=self.open["id"], output_index=len(self.items), content_index=0, delta=text,
                        **extra)

    async def begin(self, kind: str) -> None:
        """Open a ``reasoning`` or ``message`` item (its ``added`` events), unless one of that kind is open."""
        if self.open is not None and self.open["kind"] == kind:
            return
        await self.close()
        item_id = f"{'rs' if kind == 'reasoning' else 'msg'}_{uuid.uuid4().hex}"
        self.open = {"kind": kind, "id": item_id, "text": ""}
        made = reasoning_item if kind == "reasoning" else message_item
        await self.send("response.output_item.added", output_index=len(self.items),
                        item=made("", item_id, "in_progress"))
        part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else _text_part("")
        await self.send("response.content_part.added", item_id=item_id, output_index=len(self.items),
                        content_index=0, part=part)

    async def close(self, status: str = "completed") -> None:
        """End the open item with its ``done`` events; ``status`` "incomplete" for one cut by max_output_tokens."""
        item, self.open = self.open, None
        if item is None:
            return
        index, text = len(self.items), item["text"]
        if item["kind"] == "function_call":
            await self.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=text, name=item["name"])
            done = call_item(item["call_id"], item["name"], text, item["id"], status)
        else:
            is_reasoning = item["kind"] == "reasoning"
            await self.send("response.reasoning_text.done" if is_reasoning else "response.output_text.done",
                            item_id=item["id"], output_index=index, content_index=0, text=text,
                            **({} if is_reasoning else {"logprobs": []}))
            part = {"type": "reasoning_text", "text": text} if is_reasoning else _text_part(text)
            await self.send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part)
            done = (reasoning_item if is_reasoning else message_item)(text, item["id"], status)
        await self.send("response.output_item.done", output_index=index, item=done)
        self.items.append(done)


async def _write_all(writer: _ItemWriter, body: GenerateRequest, generation: Generation, tokenizer: Any) -> bool:
    """Every output of the choice through the chat route's reader into items (an empty message where nothing was
    written), the last item "incomplete" where max_output_tokens cut it; False (after an ``error`` event) where
    the generation failed, which a whole response raises."""
    reader = (body.parsing_for(tokenizer, generation.prompt_ids) or ChoiceParsing()).reader()
    async for out in generation.outputs():
        if out.finish_reason == "error":
            error = generation_error(out)
            if writer.events is None:
                raise error
            await writer.send("error", code=error.code or "internal_error", message=error.message, param=None)
            return False
        delta = reader.feed(out.text)
        if out.token_id >= 0 and reader.is_thinking:
            writer.num_reasoning_tokens += 1
        if out.finish_reason is not None:
            delta += reader.finish()
        await writer.write(delta)
    if not writer.items and writer.open is None:
        await writer.begin("message")
    await writer.close("incomplete" if generation.finish_reason == "length" else "completed")
    return True


async def _stream(request: web.Request, body: GenerateRequest, shape: ResponseShape, generation: Generation,
                  tokenizer: Any) -> web.StreamResponse:
    events = await EventStream.open(request)
    writer = _ItemWriter(events)
    try:
        await writer.send("response.created", response=shape.response([], None, status="in_progress"))
        await writer.send("response.in_progress", response=shape.response([], None, status="in_progress"))
        if await _write_all(writer, body, generation, tokenizer):
            response = shape.response(writer.items, generation, writer.num_reasoning_tokens)
            await writer.send(f"response.{response['status']}", response=response)
        with contextlib.suppress(ConnectionResetError):
            await events.response.write_eof()
    except ConnectionResetError:
        pass  # the client left: leaving the block cancels the request
    return events.response
