"""``fdctl client``: stream one request over the ``/v1/stream`` WebSocket.

Tokens are printed as they arrive (flushed one by one); a one-line summary
(tokens, time to first token, tokens/s) goes to stderr at the end.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError
from fastdecode.cli.serve import API_KEY_ENV

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"
OPEN_TIMEOUT_S = 10.0


@dataclass
class StreamSummary:
    num_tokens: int = 0
    time_to_first_token_s: float | None = None
    elapsed_s: float = 0.0
    finish_reason: str | None = None

    def line(self) -> str:
        ttft = "-" if self.time_to_first_token_s is None else f"{self.time_to_first_token_s * 1000:.0f} ms"
        rate = self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"{self.num_tokens} tokens, time to first token {ttft}, {rate:.1f} tokens/s "
                f"(finish: {self.finish_reason})")


def stream_request(url: str, request: dict[str, Any], *, api_key: str | None, out: TextIO,
                   is_jsonl: bool) -> StreamSummary:
    """Send ``request``, write each token to ``out`` as it comes; server errors raise ``OneLineError``."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    summary = StreamSummary()
    start = time.monotonic()
    try:
        with connect(url, additional_headers=headers, open_timeout=OPEN_TIMEOUT_S, max_size=None) as ws:
            ws.send(json.dumps(request))
            for raw in ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "token":
                    if summary.time_to_first_token_s is None:
                        summary.time_to_first_token_s = time.monotonic() - start
                    summary.num_tokens += 1
                    out.write(json.dumps(message, ensure_ascii=False) + "\n" if is_jsonl else message["text"])
                    out.flush()
                elif kind == "done":
                    summary.finish_reason = message.get("finish_reason")
                    if is_jsonl:
                        out.write(json.dumps(message) + "\n")
                    elif summary.num_tokens:
                        out.write("\n")
                    out.flush()
                    break
                elif kind == "error":
                    raise OneLineError(f"server error: {message.get('message')}")
            else:
                raise OneLineError("the server closed the stream before it was done")
    except InvalidStatus as exc:
        status = exc.response.status_code
        detail = _error_message(exc.response.body)
        raise OneLineError(f"the server refused the stream (HTTP {status}){': ' + detail if detail else ''}") from None
    except InvalidURI as exc:
        raise OneLineError(f"bad --url {url!r}: {exc}") from None
    except (OSError, TimeoutError, InvalidHandshake, WebSocketException) as exc:
        raise OneLineError(f"cannot stream from {url}: {exc}") from None
    summary.elapsed_s = time.monotonic() - start
    return summary


def _error_message(body: bytes | None) -> str:
    try:
        return json.loads(body or b"")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""


@click.command("client", cls=OneLineCommand)
@click.argument("prompt")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The server's /v1/stream WebSocket.")
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True,
              help="Bearer key, if the server needs one.")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS.")
@click.option("--chat", "is_chat", is_flag=True, help="Send PROMPT as a user message (chat template).")
@click.option("--jsonl", "is_jsonl", is_flag=True, help="Print each server message as one JSON line.")
def client(prompt: str, url: str, api_key: str | None, max_tokens: int, temperature: float, seed: int | None,
           ignore_eos: bool, is_chat: bool, is_jsonl: bool) -> None:
    """Stream a completion of PROMPT from a running server, token by token."""
    request: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos}
    if seed is not None:
        request["seed"] = seed
    if is_chat:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    summary = stream_request(url, request, api_key=api_key, out=sys.stdout, is_jsonl=is_jsonl)
    click.echo(summary.line(), err=True)
