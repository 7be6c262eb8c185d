"""OpenAI's Responses API request (``POST /v1/responses``) as the chat request it asks for, as vLLM serves it.

``chat_body_of`` turns the body into a chat completions body, which ``parse_chat`` then checks as the chat route
does (sampling fields, tools, structured outputs), so both routes take the same values the same way:

- ``input``: a text (one user message) or a list of items: messages (``role`` user, system, developer (a system
  message), assistant; ``content`` a text or ``input_text`` / ``output_text`` parts), ``function_call`` items (an
  assistant's tool calls, consecutive ones in one message) and ``function_call_output`` items (tool messages);
  ``reasoning`` items are dropped (the template is not given a model's earlier thinking). ``instructions`` come
  first, as a system message.
- ``tools``: function tools (``{"type": "function", "name", "description", "parameters"}``; an empty list is none);
  ``tool_choice`` "none", "auto" (without tools: none), "required" or ``{"type": "function", "name"}``;
  ``parallel_tool_calls``.
- ``text.format``: ``text``, ``json_object`` or ``json_schema`` (``name``, ``schema``): the chat's ``response_format``.
- ``max_output_tokens``; ``temperature``, ``top_p`` and vLLM's extra sampling fields (``top_k``, ``min_p``,
  ``seed``, ``stop``, ``structured_outputs``, ``guided_regex``, ...); ``stream``.

What would change the output and is not done here is a 400 naming the field: ``previous_response_id`` and
``conversation`` (no response is kept: send the whole input), ``background``, ``reasoning.effort``, built-in tools
(web search, file search, ...), ``include`` values, ``truncation: "auto"``, ``max_tool_calls``, ``top_logprobs``.
``store``, ``metadata``, ``user`` and the like change nothing and are taken.
"""
from __future__ import annotations

from typing import Any

from fastdecode.actors.frontend.errors import bad_request

# fields taken as they are into the chat body: vLLM's sampling extras, which the chat route checks
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "stop", "logit_bias", "min_tokens", "ignore_eos", "stop_token_ids",
                   "structured_outputs", "skip_special_tokens", "include_stop_str_in_output", "bad_words",
                   "allowed_token_ids", "chat_template_kwargs", "include_reasoning", "model", "stream",
                   "guided_json", "guided_regex", "guided_choice", "guided_grammar")
HARMLESS_FIELDS = ("store", "metadata", "user", "service_tier", "safety_identifier", "prompt_cache_key",
                   "stream_options")  # taken, changing nothing here
REFUSED_FIELDS = {  # field -> its values that change nothing
    "previous_response_id": (None,), "conversation": (None,), "background": (None, False), "include": (None, []),
    "truncation": (None, "disabled"), "max_tool_calls": (None,), "top_logprobs": (None, 0), "prompt": (None,),
}
MESSAGE_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")


def chat_body_of(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions body a Responses request asks for; 400 naming the field for what is not taken."""
    known = {"input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "max_output_tokens",
             "reasoning", *SAMPLING_FIELDS, *HARMLESS_FIELDS, *REFUSED_FIELDS}
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise bad_request(f"{unknown[0]} is not a Responses API field this server takes", unknown[0])
    for name, harmless in REFUSED_FIELDS.items():
        if body.get(name) not in harmless:
            reason = ("; no response is kept: send the whole conversation as input"
                      if name in ("previous_response_id", "conversation") else "")
            raise bad_request(f"{name} is not supported{reason}", name)
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict)
                                  or any(reasoning.get(k) is not None for k in ("effort", "summary",
                                                                                 "generate_summary"))):
        raise bad_request("reasoning effort and summaries are not supported (a reasoning model thinks as its "
                          "template lets it; see --reasoning-parser)", "reasoning")
    chat: dict[str, Any] = {name: body[name] for name in SAMPLING_FIELDS if name in body}
    chat["messages"] = _instructions(body.get("instructions")) + _messages(body.get("input"))
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("tools"):  # an empty list is no tools (the Agents SDK sends one for an agent without tools)
        chat["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is not None and not (choice in ("auto", "none") and not chat.get("tools")):  # auto of none: none
        chat["tool_choice"] = _tool_choice(choice)
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("text") is not None:
        response_format = _text_format(body["text"])
        if response_format is not None:
            chat["response_format"] = response_format
    return chat


def _instructions(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, str):
        raise bad_request("instructions must be a string", "instructions")
    return [{"role": "system", "content": value}]


def _messages(value: Any) -> list[dict[str, Any]]:
    """The chat messages of ``input``."""
    if isinstance(value, str):
        if not value:
            raise bad_request("input is empty", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a non-empty string or a non-empty list of items", "input")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{param} must be an object", param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = {"id": _text(item, "call_id", param), "type": "function",
                    "function": {"name": _text(item, "name", param), "arguments": _text(item, "arguments", param)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):  # output parts
                output = _joined_parts(output, f"{param}.output")
            if not isinstance(output, str):
                raise bad_request(f"{param}.output must be a string", f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": _text(item, "call_id", param), "content": output})
        elif kind != "reasoning":
            raise bad_request(f"{param}: items of type {kind!r} are not supported (messages, function_call, "
                              "function_call_output and reasoning are)", param)
    if not messages:
        raise bad_request("input holds no message", "input")
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = MESSAGE_ROLES.get(item.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise bad_request(f"{param}.role must be one of {', '.join(MESSAGE_ROLES)}", f"{param}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = _joined_parts(content, f"{param}.content")
    if not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string or a list of text parts", f"{param}.content")
    return {"role": role, "content": content}


def _joined_parts(parts: list[Any], param: str) -> str:
    texts = [p.get("text") if isinstance(p, dict) and p.get("type") in TEXT_PARTS else None for p in parts]
    if not all(isinstance(t, str) for t in texts):
        raise bad_request(f"{param}: only text parts ({', '.join(TEXT_PARTS)}) are supported", param)
    return "\n".join(texts)  # type: ignore[arg-type]


def _text(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{name} must be a string", f"{param}.{name}")
    return value


def _tools(value: Any) -> list[dict[str, Any]]:
    """Function tools in the chat form; built-in tools are a 400."""
    if not isinstance(value, list):
        raise bad_request("tools must be a list", "tools")
    tools = []
    for index, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"tools[{index}]: only function tools are supported, got {kind!r}", f"tools[{index}]")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    if isinstance(value, dict):
        raise bad_request(f"a tool_choice of type {value.get('type')!r} is not supported: give none, auto, required "
                          'or {"type": "function", "name"}', "tool_choice")
    return value


def _text_format(value: Any) -> dict[str, Any] | None:
    """``text.format`` as the chat's ``response_format`` (None: plain text)."""
    if not isinstance(value, dict):
        raise bad_request("text must be an object", "text")
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object with a type", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if fmt.get("schema") is None:
            raise bad_request("a json_schema text.format needs its schema", "text.format")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"]}}
    raise bad_request(f"text.format type must be text, json_object or json_schema, got {kind!r}", "text.format")
