"""fdctl bench serve's prompt ids against a fake OpenAI-style server (in a thread): slices of ``POST /tokenize``'s
ids by default, the old ``[0, 1000)`` draw when the server has no /tokenize, and exit 1 when nothing succeeded."""
from __future__ import annotations

import json

import pytest
from aiohttp import web
from click.testing import CliRunner
from fake_openai import FakeOpenAI, serving

from fastdecode.cli.bench import bench
from fastdecode.cli.serve import API_KEY_ENV

pytestmark = pytest.mark.timeout(30)
VOCAB = 40  # far below bench serve's fallback draw of [0, 1000)


class FakeServer(FakeOpenAI):
    """/v1/models, an optional /tokenize (one id per letter) refusing texts over ``max_chars``, and a streaming
    /v1/completions that refuses ids outside [0, VOCAB) as fastdecode does; records what it was sent."""

    def __init__(self, *, has_tokenize: bool, max_chars: int = 1 << 30) -> None:
        self.has_tokenize, self.max_chars = has_tokenize, max_chars
        self.tokenize_bodies: list[dict] = []
        self.tokenized: list[int] = []
        self.prompts: list[list[int]] = []

    def extra_routes(self, app: web.Application) -> None:
        if self.has_tokenize:
            app.router.add_post("/tokenize", self.tokenize)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokenize_bodies.append(body)
        if len(body["prompt"]) > self.max_chars:
            return web.json_response({"error": {"message": "the prompt is too long"}}, status=400)
        self.tokenized = [ord(c) % VOCAB for c in body["prompt"] if c != " "]
        return web.json_response({"count": len(self.tokenized), "max_model_len": 64, "tokens": self.tokenized})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        if not all(0 <= t < VOCAB for t in prompt):
            return web.json_response({"error": {"message": f"prompt token ids must be integers in [0, {VOCAB})"}},
                                     status=400)
        self.prompts.append(prompt)
        return await self.stream_tokens(request, body)


def bench_serve(url: str, *args: str):
    args = ["serve", "--url", url, "--rate", "100", "--num-requests", "3", "--prompt-len", "7", "--output-len", "2",
            *args]
    return CliRunner().invoke(bench, args, env={API_KEY_ENV: None})


def is_cyclic_run(prompt: list[int], source: list[int]) -> bool:
    return any(all(source[(start + i) % len(source)] == t for i, t in enumerate(prompt))
               for start in range(len(source)))


@pytest.mark.parametrize("max_chars", [1 << 30, 300], ids=["any-length", "long-text-refused"])
def test_prompts_are_slices_of_the_servers_token_ids(max_chars):
    fake = FakeServer(has_tokenize=True, max_chars=max_chars)
    with serving(fake) as url:
        result = bench_serve(url)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_ok"] == 3 and out["num_errors"] == 0 and out["first_error"] is None
    assert out["prompt_ids"] == f"/tokenize ({len(fake.tokenized)} ids)"
    assert all(body["model"] == "fake" and body["add_special_tokens"] is False for body in fake.tokenize_bodies)
    assert len(fake.tokenize_bodies) == (1 if max_chars > 1000 else 2)  # a refused (400) text is retried shorter
    assert len(fake.tokenize_bodies[-1]["prompt"]) <= max_chars
    assert len(fake.prompts) == 3
    assert all(len(p) == 7 and is_cyclic_run(p, fake.tokenized) for p in fake.prompts), fake.prompts


def test_without_tokenize_it_says_so_and_exits_1_when_every_request_fails():
    fake = FakeServer(has_tokenize=False)
    with serving(fake) as url:
        result = bench_serve(url)
    assert result.exit_code == 1, result.output
    assert f"{url} has no /tokenize (HTTP 404): prompt token ids are drawn from [0, 1000)" in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])  # the figures come even so
    assert out["num_ok"] == 0 and out["num_errors"] == 3 and out["prompt_ids"] == "[0, 1000)"
    first = f"HTTP 400: prompt token ids must be integers in [0, {VOCAB})"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: all 3 requests failed; the first: {first}"] and "Traceback" not in result.output


def test_vocab_option_draws_ids_without_tokenizing():
    fake = FakeServer(has_tokenize=True)
    with serving(fake) as url:
        result = bench_serve(url, "--vocab", str(VOCAB))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_ok"] == 3 and out["prompt_ids"] == f"[0, {VOCAB})" and fake.tokenize_bodies == []
    assert all(len(p) == 7 for p in fake.prompts)
