"""The structured-output fields of a request body, as vLLM takes them: OpenAI's ``response_format`` (``text``,
``json_object``, ``json_schema``), vLLM's ``structured_outputs`` object (``json``, ``json_object``, ``regex``,
``choice``, ``grammar``) and its older ``guided_json``, ``guided_regex``, ``guided_choice`` and ``guided_grammar``.
At most one of them; each becomes a ``StructuredOutputs`` (a 400 naming the field for what is wrong with it).
A ``structured_outputs`` holding only options (``disable_any_whitespace``) applies them to the spec another field
gives."""
from __future__ import annotations

import dataclasses
from typing import Any

from fastdecode.actors.frontend.errors import bad_request
from fastdecode.actors.request import RequestError
from fastdecode.actors.structured_output import KINDS, StructuredOutputs

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
OPTION_KEYS = frozenset({"disable_any_whitespace"})  # how a spec is held to, with it or with another field
STRUCTURED_KEYS = frozenset(KINDS) | OPTION_KEYS


def structured_outputs_field(body: dict[str, Any], given: tuple[str, StructuredOutputs] | None = None,
                             ) -> StructuredOutputs | None:
    """The request's structured outputs, or None for plain text; ``given``: the field and spec another field implies
    (a named or required ``tool_choice``), which counts as one of them."""
    specs: list[tuple[str, StructuredOutputs]] = [given] if given is not None else []
    response_format = body.get("response_format")
    if response_format is not None:
        spec = _response_format(response_format)
        if spec is not None:
            specs.append(("response_format", spec))
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        unknown = sorted(k for k, v in structured.items() if k not in STRUCTURED_KEYS and v not in (None, False))
        if unknown:
            raise bad_request(f"structured_outputs takes {', '.join(sorted(STRUCTURED_KEYS))}; "
                              f"{', '.join(unknown)} is not supported", "structured_outputs")
        options = {k: v for k, v in structured.items() if k in OPTION_KEYS}
        fields = {k: v for k, v in structured.items() if k in STRUCTURED_KEYS - OPTION_KEYS}  # not "param"
        if fields or not options:  # options alone apply to the spec another field gives
            specs.append(("structured_outputs", _spec("structured_outputs", **fields, **options)))
    else:
        options = {}
    for name, key in GUIDED_FIELDS.items():
        if body.get(name) is not None:
            specs.append((name, _spec(name, **{key: body[name]})))
    if len(specs) > 1:
        raise bad_request(f"give one structured output, not {len(specs)} ({', '.join(n for n, _ in specs)})",
                          specs[1][0])
    if not specs:
        if options:
            raise bad_request("structured_outputs gives options but no json, json_object, regex, choice or "
                              "grammar, and no response_format or guided_* field does", "structured_outputs")
        return None
    name, spec = specs[0]
    return _replaced(name, spec, options) if options else spec


def _replaced(param: str, spec: StructuredOutputs, options: dict[str, Any]) -> StructuredOutputs:
    try:
        return dataclasses.replace(spec, **options)
    except RequestError as exc:
        raise bad_request(str(exc), param) from None


def _response_format(value: Any) -> StructuredOutputs | None:
    """OpenAI's ``response_format``: ``text`` (None), ``json_object``, or ``json_schema`` with its ``schema``."""
    if not isinstance(value, dict):
        raise bad_request(f"response_format must be an object with a type, got {type(value).__name__}",
                          "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _spec("response_format", json_object=True)
    if kind == "json_schema":
        json_schema = value.get("json_schema")
        if not isinstance(json_schema, dict) or json_schema.get("schema") is None:
            raise bad_request("a json_schema response_format needs json_schema.schema", "response_format")
        return _spec("response_format", json=json_schema["schema"])
    raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                      "response_format")


def _spec(param: str, **fields: Any) -> StructuredOutputs:
    try:
        return StructuredOutputs(**fields, param=param)
    except RequestError as exc:
        raise bad_request(str(exc), param) from None
