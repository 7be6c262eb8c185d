"""A chat request's ``tools`` and ``tool_choice``, as vLLM takes them.

- ``tools``: a non-empty list of ``{"type": "function", "function": {"name", "description", "parameters"}}``;
  they go to the chat template's ``tools`` variable. The legacy ``functions`` / ``function_call`` are taken as
  tools and tool_choice (vLLM's alias).
- ``tool_choice``: ``"none"`` (the default without tools): the model may see the tools but no call is parsed;
  ``"auto"`` (the default with tools): the server's ``--tool-call-parser`` finds the calls the model chose to write,
  and needs ``--enable-auto-tool-choice`` (else 400, as vLLM); ``"required"``: structured outputs hold the text to a
  JSON array of one or more calls of the given tools; ``{"type": "function", "function": {"name"}}``: structured
  outputs hold the text to that function's parameters.
- ``parallel_tool_calls`` false: at most one call (``required`` holds the array to one item).

A request's own structured output (``response_format``, ``guided_json``, ...) goes with ``"none"`` or ``"auto"``,
not with the two forms that are themselves structured outputs (400).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fastdecode.actors.frontend.body_fields import boolean_field
from fastdecode.actors.frontend.errors import bad_request
from fastdecode.actors.tool_parsers import (
    PARSERS,
    Extractor,
    HermesCalls,
    Llama3JsonCalls,
    NamedCall,
    RequiredCalls,
)
from fastdecode.actors.request import RequestError
from fastdecode.actors.structured_output import StructuredOutputs

CHOICES = ("none", "auto", "required")
NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(frozen=True)
class ToolServing:
    """The server's tool calling (vLLM's ``--enable-auto-tool-choice`` and ``--tool-call-parser``)."""

    is_auto_enabled: bool = False
    parser: str | None = None

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {self.parser!r}: this server has {', '.join(PARSERS)}")
        if self.is_auto_enabled and self.parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                             f"{', '.join(PARSERS)})")


@dataclass(frozen=True)
class ToolCalling:
    """What a chat request asks of its tools: ``choice`` "auto", "required" or "named" (``function_name``)."""

    choice: str
    tools: tuple[dict[str, Any], ...]
    function_name: str | None = None
    parser: str | None = None  # auto: the server's
    is_parallel: bool = True

    @property
    def is_auto(self) -> bool:
        return self.choice == "auto"

    def structured_outputs(self) -> StructuredOutputs | None:
        """The spec that holds a named or required choice's text to its calls (None for auto)."""
        if self.choice == "named":
            schema = self._function(self.function_name)["parameters"] or {"type": "object", "properties": {}}
        elif self.choice == "required":
            try:
                schema = self._required_schema()
            except RecursionError:
                raise bad_request("a tool's parameters nest too deeply", "tools") from None
        else:
            return None
        try:
            return StructuredOutputs(json=schema, param="tools")
        except RequestError as exc:
            raise bad_request(str(exc), "tools") from None

    def extractor(self) -> Extractor:
        """A fresh reader of one choice's text."""
        if self.choice == "named":
            assert self.function_name is not None
            return NamedCall(self.function_name)
        if self.choice == "required":
            return RequiredCalls(self.is_parallel)
        return HermesCalls(self.is_parallel) if self.parser == "hermes" else Llama3JsonCalls(self.is_parallel)

    def _function(self, name: str | None) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    def _required_schema(self) -> dict[str, Any]:
        """vLLM's: an array of at least one ``{"name": one tool's, "parameters": its schema}``; the tools' ``$defs``
        merged at the top (a name defined twice differently is a 400)."""
        defs: dict[str, Any] = {}
        options = []
        for index, tool in enumerate(self.tools):
            parameters = copy.deepcopy(tool["function"]["parameters"]) or {"type": "object", "properties": {}}
            for name, schema in (parameters.pop("$defs", None) or {}).items():
                if name in defs and defs[name] != schema:
                    raise bad_request(f"tools define $defs {name!r} twice, differently: not supported with "
                                      'tool_choice "required"', f"tools[{index}]")
                defs[name] = schema
            options.append({"properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                           "parameters": parameters},
                            "required": ["name", "parameters"]})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
        if not self.is_parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return schema


def tools_and_choice(body: dict[str, Any], serving: ToolServing | None,
                     ) -> tuple[list[dict[str, Any]] | None, ToolCalling | None]:
    """The request's tools (for the chat template; None when none) and what it asks of them (None: no calls
    parsed); ``serving`` None: calls are not parsed on this route (only ``tool_choice: "none"`` is taken)."""
    body = _legacy_functions(body)
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return tools, None
    if tools is None:
        raise bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if serving is None:
        raise bad_request('tool calls are not parsed here: give tool_choice "none" (the model may still see the '
                          "tools), or use /v1/chat/completions", "tool_choice")
    is_parallel = boolean_field(body, "parallel_tool_calls", default=True)
    if isinstance(choice, dict):
        return tools, ToolCalling("named", tuple(tools), _named(choice, tools), is_parallel=is_parallel)
    if choice not in CHOICES:
        raise bad_request(f"Invalid value for `tool_choice`: {choice!r}! Only named tools, \"none\", \"auto\" or "
                          '"required" are supported.', "tool_choice")
    if choice == "auto" and not serving.is_auto_enabled:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                          '(or give tool_choice "none", "required" or a named function)', "tool_choice")
    return tools, ToolCalling(choice, tuple(tools), parser=serving.parser if choice == "auto" else None,
                              is_parallel=is_parallel)


def tools_field(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's ``tools`` (or legacy ``functions``), checked; None when none."""
    return _tools(_legacy_functions(body).get("tools"))


def _legacy_functions(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's deprecated ``functions`` and ``function_call`` as ``tools`` and ``tool_choice`` (vLLM's alias)."""
    functions = body.get("functions")
    if functions is None:
        if body.get("function_call") is not None:
            raise bad_request("function_call needs functions", "function_call")
        return body
    if body.get("tools") is not None:
        raise bad_request("give tools or the legacy functions, not both", "functions")
    if not isinstance(functions, list):
        raise bad_request("functions must be a list", "functions")
    body = {**body, "tools": [{"type": "function", "function": f} for f in functions]}
    call = body.get("function_call")
    names = [f.get("name") for f in functions if isinstance(f, dict)]
    if isinstance(call, dict) and call.get("name") not in names:
        raise bad_request(f"function_call names {call.get('name')!r}, which is not one of the functions",
                          "function_call")
    if body.get("tool_choice") is None and call is not None:
        body["tool_choice"] = {"type": "function", "function": call} if isinstance(call, dict) else call
    return body


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools must be a list", "tools")
    if not value:
        raise bad_request("`tools` must not be an empty array.", "tools")
    tools = []
    for index, tool in enumerate(value):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f'{param} must be {{"type": "function", "function": {{"name", "description", '
                              '"parameters"}}', param)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"{param}.function must be an object with a non-empty name", f"{param}.function")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"{param}.function.parameters must be a JSON schema object",
                              f"{param}.function.parameters")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise bad_request(f"{param}.function.description must be a string", f"{param}.function.description")
        tools.append({**tool, "type": "function", "function": {**function, "parameters": parameters}})
    return tools


def _named(choice: dict[str, Any], tools: list[dict[str, Any]]) -> str:
    """The function a named ``tool_choice`` names (vLLM's checks and messages)."""
    function = choice.get("function")
    if choice.get("type", "function") != "function" or not isinstance(function, dict):
        raise bad_request(f"Invalid value for `function`: `{function}` in `tool_choice`! {NAMED_USAGE}",
                          "tool_choice")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {NAMED_USAGE}", "tool_choice")
    if all(tool["function"]["name"] != name for tool in tools):
        raise bad_request("The tool specified in `tool_choice` does not match any of the specified `tools`",
                          "tool_choice")
    return name
