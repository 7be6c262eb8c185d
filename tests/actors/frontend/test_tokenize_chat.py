"""``POST /tokenize`` of a chat counts what a chat completion of it runs: the same template variables
(``chat_template_kwargs``) and ``add_special_tokens``, so the same prompt ids.  No engine runs: a stand-in
records the prompt ids a chat completion submits."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from app_client import app_client
from fastdecode.actors.api import StreamOutput
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.model.synthetic_tokenizer import CHAT_TEMPLATE
from synthetic_tokenizers import synthetic_tokenizer

THINKING_TEMPLATE = "{% if enable_thinking %}<think>{% endif %}" + CHAT_TEMPLATE
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]


class RecordingLLM:
    """What the routes use of an ``AsyncLLM``; every request ends at once, its prompt ids kept."""

    def __init__(self) -> None:
        self.tokenizer = synthetic_tokenizer(chat_template=THINKING_TEMPLATE, add_bos_token=True)
        self.max_model_len, self.max_num_choices = 512, 8
        self.model_config = SimpleNamespace(sampling_defaults=SamplingDefaults())
        self.prompts: list[list[int]] = []

    def stream(self, prompt_ids, params):
        self.prompts.append(list(prompt_ids))
        return self._stream()

    async def _stream(self):
        yield StreamOutput(1, 5, "x", finish_reason="length")


@pytest.fixture
async def served():
    llm = RecordingLLM()
    async with app_client(llm) as client:
        yield client, llm


async def post(client, path: str, body: dict) -> tuple[int, dict]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


@pytest.mark.parametrize("extra", [{"chat_template_kwargs": {"enable_thinking": True}},
                                   {"chat_template_kwargs": {"enable_thinking": True}, "add_special_tokens": True},
                                   {}])
async def test_tokenize_gives_the_ids_a_chat_completion_runs(served, extra):
    client, llm = served
    status, completion = await post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, **extra})
    assert status == 200, completion
    status, tokenized = await post(client, "/tokenize", {"messages": MESSAGES, **extra})
    assert status == 200, tokenized
    assert tokenized["tokens"] == llm.prompts[-1] and tokenized["count"] == completion["usage"]["prompt_tokens"]
    is_thinking = "chat_template_kwargs" in extra
    assert (llm.prompts[-1] != llm.tokenizer.encode_chat(MESSAGES)) == is_thinking  # the variables count


@pytest.mark.parametrize("body, param", [
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_special_tokens": True}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),  # the server tokenizes, not the template
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"tools": {"type": "function"}, "tool_choice": "none"}, "tools"),
    ({"add_generation_prompt": "no"}, "add_generation_prompt"),
])
async def test_tokenize_refuses_what_the_chat_route_refuses(served, body, param):
    client, _ = served
    status, got = await post(client, "/tokenize", {"messages": MESSAGES, **body})
    assert status == 400 and got["error"]["param"] == param, got
    status, got = await post(client, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 400, got


async def test_tokenize_renders_the_tools_a_chat_completion_renders(served):
    """A chat completion with tools and tool_choice "none" gives them to the template; /tokenize of the same body
    counts the same prompt (vLLM's chat tokenize request takes tools)."""
    client, llm = served
    llm.tokenizer = synthetic_tokenizer(chat_template="{% for t in tools or [] %}[{{ t['function']['name'] }}]"
                                                      "{% endfor %}" + CHAT_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"messages": MESSAGES, "tools": tools, "tool_choice": "none"}
    status, completion = await post(client, "/v1/chat/completions", {**body, "max_tokens": 1})
    assert status == 200, completion
    status, tokenized = await post(client, "/tokenize", body)
    assert status == 200, tokenized
    assert tokenized["tokens"] == llm.prompts[-1] and tokenized["count"] == completion["usage"]["prompt_tokens"]
    assert llm.prompts[-1] != llm.tokenizer.encode_chat(MESSAGES)  # the tools are in it


async def test_a_template_that_refuses_the_messages_names_them_not_the_kwargs():
    """A template that fails to render the messages (here it calls what a message has not) is about them, or the
    template; only where the request gave chat_template_kwargs may they be what broke it."""
    from fastdecode.actors.frontend.errors import ApiError
    from fastdecode.actors.frontend.generation import chat_token_ids

    strict = synthetic_tokenizer(chat_template="{{ messages[0].content.no_such_method() }}")
    for kwargs, param in ((None, "messages"), ({"enable_thinking": True}, "chat_template_kwargs")):
        with pytest.raises(ApiError) as refused:
            await chat_token_ids(strict, MESSAGES, template_kwargs=kwargs)
        assert (refused.value.status, refused.value.param) == (400, param)
        assert "no_such_method" in refused.value.message and "chat template failed" in refused.value.message
