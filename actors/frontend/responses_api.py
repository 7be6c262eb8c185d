"""``POST /v1/responses``: OpenAI's Responses API over the chat route's engine path, as vLLM serves it.

The request becomes a chat request (``responses_request``); its one choice's text is read as the chat route reads
it (``choice_text``: a reasoning model's thinking, then the tool calls the request asks for) into output items: a
``reasoning`` item, a ``message`` with one ``output_text`` part, and a ``function_call`` item per call. A response
cut by ``max_output_tokens`` is ``incomplete`` (reason ``max_output_tokens``). Streamed, the API's events come as
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
from typing import Any

from aiohttp import web

from fastdecode.actors.frontend.choice_text import ChoiceParsing
from fastdecode.actors.frontend.generation import Generation, generation_error, json_response, start_generations
from fastdecode.actors.frontend.openai_request import GenerateRequest, parse_body, parse_chat
from fastdecode.actors.frontend.responses_request import chat_body_of
from fastdecode.actors.frontend.sse import EventStream
from fastdecode.actors.frontend.state import STATE
from fastdecode.actors.tool_parsers import ToolDelta, merge_calls


async def responses(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    llm = state.require_llm()
    raw = await parse_body(await request.read(), lambda decoded: decoded)
    config = state.config
    body = parse_chat(chat_body_of(raw), tool_serving=config.tool_serving,
                      reasoning_parser=config.reasoning_parser).for_tokenizer(llm.tokenizer)
    state.check_model(body.model)
    shape = ResponseShape(raw, state.config.served_model_name)
    async with start_generations(llm, state.metrics, body) as generations:
        (generation,) = generations
        if body.is_stream:
            return await _stream(request, body, shape, generation)
        texts = []
        async for out in generation.outputs():
            if out.finish_reason == "error":
                raise generation_error(out)
            texts.append(out.text)
        reader = (body.parsing or ChoiceParsing()).reader()
        delta = reader.feed("".join(texts))
        delta += reader.finish()
        items = shape.items(delta.reasoning, delta.content, merge_calls(delta.calls))
        return await json_response(lambda: shape.response(items, generation), num_tokens=generation.num_output_tokens)


class ResponseShape:
    """What every event of one response repeats, and its items and envelope."""

    def __init__(self, raw: dict[str, Any], model: str) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.raw = raw

    def items(self, reasoning: str, content: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The output items of a whole text: its reasoning, its message (where it has text, or nothing else), its
        calls."""
        items = []
        if reasoning:
            items.append(reasoning_item(reasoning))
        if content or not calls:
            items.append(message_item(content))
        items += [call_item(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
        return items

    def response(self, items: list[dict[str, Any]], generation: Generation | None,
                 status: str | None = None) -> dict[str, Any]:
        """The Response object; ``status`` from the generation's end where not given ("in_progress" before)."""
        if status is None:
            status = "incomplete" if generation is not None and generation.finish_reason == "length" else "completed"
        usage = None
        if generation is not None:
            num_in, num_out = len(generation.prompt_ids), generation.num_output_tokens
            usage = {"input_tokens": num_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": num_out,
                     "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": num_in + num_out}
        raw = self.raw
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": raw.get("instructions"), "max_output_tokens": raw.get("max_output_tokens"),
            "model": self.model, "output": items, "parallel_tool_calls": raw.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": raw.get("store", True), "temperature": raw.get("temperature"),
            "text": raw.get("text") or {"format": {"type": "text"}}, "tool_choice": raw.get("tool_choice", "auto"),
            "tools": raw.get("tools") or [], "top_p": raw.get("top_p"), "truncation": "disabled", "usage": usage,
            "user": raw.get("user"), "metadata": raw.get("metadata") or {},
        }


def reasoning_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else [], "status": status}


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": content}


def call_item(call_id: str, name: str, arguments: str, item_id: str | None = None,
              status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _EventWriter:
    """The stream's events, numbered, and the items they make: at most one item open at a time."""

    def __init__(self, events: EventStream, shape: ResponseShape) -> None:
        self.events, self.shape = events, shape
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being written: its kind, id, text, call index
        self.calls: dict[int, dict[str, Any]] = {}  # a call's index -> its open item

    async def send(self, kind: str, **fields: Any) -> None:
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

    async def close(self) -> None:
        """End the open item with its ``done`` events."""
        item, self.open = self.open, None
        if item is None:
            return
        index, text = len(self.items), item["text"]
        if item["kind"] == "function_call":
            await self.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=text, name=item["name"])
            done = call_item(item["call_id"], item["name"], text, item["id"])
        else:
            is_reasoning = item["kind"] == "reasoning"
            await self.send("response.reasoning_text.done" if is_reasoning else "response.output_text.done",
                            item_id=item["id"], output_index=index, content_index=0, text=text,
                            **({} if is_reasoning else {"logprobs": []}))
            part = {"type": "reasoning_text", "text": text} if is_reasoning else _text_part(text)
            await self.send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part)
            done = (reasoning_item if is_reasoning else message_item)(text, item["id"])
        await self.send("response.output_item.done", output_index=index, item=done)
        self.items.append(done)


async def _stream(request: web.Request, body: GenerateRequest, shape: ResponseShape,
                  generation: Generation) -> web.StreamResponse:
    events = await EventStream.open(request)
    writer = _EventWriter(events, shape)
    reader = (body.parsing or ChoiceParsing()).reader()
    try:
        await writer.send("response.created", response=shape.response([], None, "in_progress"))
        await writer.send("response.in_progress", response=shape.response([], None, "in_progress"))
        async for out in generation.outputs():
            if out.finish_reason == "error":
                error = generation_error(out)
                await writer.send("error", code=error.code or "internal_error", message=error.message, param=None)
                break
            delta = reader.feed(out.text)
            if out.finish_reason is not None:
                delta += reader.finish()
            await writer.write(delta)
        else:
            if not writer.items and writer.open is None:  # nothing was written: an empty message
                await writer.begin("message")
            await writer.close()
            response = shape.response(writer.items, generation)
            await writer.send(f"response.{response['status']}", response=response)
        with contextlib.suppress(ConnectionResetError):
            await events.response.write_eof()
    except ConnectionResetError:
        pass  # the client left: leaving the block cancels the request
    return events.response
