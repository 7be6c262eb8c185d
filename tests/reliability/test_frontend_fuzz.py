"""Hostile input (hypothesis) against a live ``fdctl serve``: malformed JSON, wrong types, huge numbers,
negative max_tokens, invalid UTF-8, on the HTTP endpoints and the WebSocket protocol. No request may
crash the server (no 5xx), none may hang it, and it answers a valid request afterwards."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from serve_helpers import TINY_ARGS, LiveServer

API_KEY = "fuzz-key"
TIMEOUT_S = 30
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stream", "logprobs", "top_logprobs", "n", "model", "ignore_eos", "min_tokens",
          "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "echo", "suffix", "role",
          "content", "stop_token_ids", "response_format", "best_of", "min_p", "skip_special_tokens",
          "add_generation_prompt", "guided_choice", "bad_words"]
PAST_FLOAT = 10**400  # json.loads gives an int that math.isfinite cannot take
HUGE = [2**31, 2**63, -2**63, 10**30, -1, -10**9, 1e308, -1e308, 0, PAST_FLOAT, -PAST_FLOAT]
SAMPLING_NUMBERS = ["temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k",
                    "min_tokens", "seed", "max_tokens"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE), st.floats(allow_nan=False),
                    st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner,
                                                 max_size=4)), max_leaves=12)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
# mostly well-formed prompts with small outputs, so some requests really generate
plausible = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(-5, 300), max_size=6))},
    optional={"max_tokens": st.one_of(st.integers(-3, 6), st.sampled_from(HUGE)),
              "temperature": st.one_of(st.floats(-2, 3), st.sampled_from(HUGE)),
              "top_p": st.floats(-1, 2), "top_k": st.integers(-3, 10**12), "stream": st.booleans(),
              "logprobs": st.one_of(st.integers(-2, 30), st.booleans()), "seed": st.sampled_from(HUGE),
              "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=3))})
raw_bodies = st.one_of(st.binary(max_size=200), st.binary(max_size=20).map(lambda b: b'{"prompt": "' + b + b'"}'),
                       st.sampled_from([b"\xff\xfe\xfd", b'{"prompt": "\xc3\x28"}', b"{", b"[]", b"null", b"1e999",
                                        b'{"prompt": "a", "max_tokens": 1e999}', b'"' + b"a" * 1000]))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_server():
    server = LiveServer(*TINY_ARGS, "--shards", "1", "--kv-memory", "64MiB", "--max-model-len", "64",
                        "--api-key", API_KEY, "--served-model-name", "tiny")
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def post(server, path: str, data: bytes, *, key: str | None = API_KEY) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_answered(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:500])
    if status >= 400:
        assert "error" in json.loads(body), body[:500]


def assert_still_serving(server) -> None:
    status, body = post(server, "/v1/completions", json.dumps({"prompt": "still there?", "max_tokens": 3, "min_tokens": 3}).encode())
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 3


@pytest.mark.slow
@FUZZ
@given(body=st.one_of(bodies, plausible), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_http_fuzzed_json(fuzz_server, body, path):
    try:
        data = json.dumps(body).encode()
    except (ValueError, OverflowError):
        return
    assert_answered(*post(fuzz_server, path, data))


@pytest.mark.slow
@FUZZ
@given(data=raw_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models"]),
       key=st.sampled_from([API_KEY, None, "wrong", "\u00e9t\u00e9"]))
def test_http_fuzzed_bytes_and_keys(fuzz_server, data, path, key):
    try:
        status, body = post(fuzz_server, path, data, key=key)
    except UnicodeEncodeError:
        return  # a header the client library itself refuses to send
    assert_answered(status, body)
    if key != API_KEY:
        assert status in (401, 405), status


@pytest.mark.slow
@FUZZ
@given(message=st.one_of(bodies.map(json.dumps), plausible.map(json.dumps), st.text(max_size=60),
                         st.binary(max_size=60)))
def test_websocket_fuzzed_messages(fuzz_server, message):
    with connect(f"{fuzz_server.ws_url}?token={API_KEY}", open_timeout=TIMEOUT_S) as ws:
        ws.send(message)
        last = None
        try:
            while True:
                last = json.loads(ws.recv(timeout=TIMEOUT_S))
                if last["type"] in ("done", "error"):
                    break
        except ConnectionClosed:
            pass
    assert last is not None and last["type"] in ("done", "error"), last
    if last["type"] == "error":
        assert last["status"] < 500, last


@pytest.mark.slow
@pytest.mark.parametrize(("path", "name", "extra"), [
    *[("/v1/completions", name, {"prompt": "x"}) for name in [*SAMPLING_NUMBERS, "logprobs"]],
    *[("/v1/chat/completions", name, {"messages": [{"role": "user", "content": "x"}], "logprobs": True})
      for name in [*SAMPLING_NUMBERS, "max_completion_tokens", "top_logprobs"]],
    *[("/v1/stream", name, {"prompt": "x"}) for name in [*SAMPLING_NUMBERS, "logprobs"]],
])
def test_ints_past_the_float_range_are_a_400_naming_the_field(fuzz_server, path, name, extra):
    """An int above ~1.8e308 made math.isfinite raise OverflowError: a 500 over HTTP, a bare close on the
    WebSocket."""
    for value in (PAST_FLOAT, -PAST_FLOAT):
        data = json.dumps({**extra, name: value})
        if path != "/v1/stream":
            status, answer = post(fuzz_server, path, data.encode())
            assert status == 400, answer[:300]
            assert json.loads(answer)["error"]["param"] == name, answer[:300]
            continue
        with connect(f"{fuzz_server.ws_url}?token={API_KEY}", open_timeout=TIMEOUT_S) as ws:
            ws.send(data)
            reply = json.loads(ws.recv(timeout=TIMEOUT_S))
        assert reply["type"] == "error" and reply["status"] == 400 and name in reply["message"], reply


@pytest.mark.slow
def test_websocket_needs_the_api_key_and_the_server_survives_it_all(fuzz_server):
    with pytest.raises(Exception, match="401"):
        with connect(fuzz_server.ws_url, open_timeout=TIMEOUT_S):
            pass
    assert_still_serving(fuzz_server)
