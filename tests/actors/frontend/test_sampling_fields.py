"""``min_p`` and ``logit_bias`` on both routes, an assistant message with null content, and ``tools`` with
``tool_choice: "none"``: parsed (no engine), then served by a live ``fdctl serve`` (random:tiny)."""
from __future__ import annotations

import pytest

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.generation import chat_token_ids
from fastdecode.actors.frontend.openai_request import parse_chat, parse_completion
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams
from synthetic_tokenizers import synthetic_tokenizer

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = "The capital of France is"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("parse, base", [(parse_completion, {"prompt": "hi"}), (parse_chat, CHAT)],
                         ids=["completion", "chat"])
def test_min_p_and_logit_bias_reach_the_sampling_params(parse, base):
    request = parse({**base, "min_p": 0.25, "logit_bias": {"7": 100, "3": -5.5}})
    params = request.sampling_params(2, 64)
    assert params.min_p == 0.25 and params.logit_bias == ((3, -5.5), (7, 100.0))


@pytest.mark.parametrize("bias", [{"a": 1}, {"-1": 1}, {" 1": 1}, {"1": "x"}, {"1": True}, [1, 2], "1"])
def test_malformed_logit_bias_is_refused(bias):
    assert refused(parse_completion, {"prompt": "hi", "logit_bias": bias}).param == "logit_bias"


@pytest.mark.parametrize("fields, param", [({"logit_bias": {"1": 101}}, "logit_bias"), ({"min_p": 1.5}, "min_p")])
def test_out_of_range_values_are_refused_naming_the_field(fields, param):
    with pytest.raises(ApiError) as caught:
        parse_completion({"prompt": "hi", **fields}).sampling_params(2, 64)
    assert caught.value.param == param


def test_an_assistant_message_with_null_content_is_empty_text():
    messages = parse_chat({"messages": HISTORY}).messages
    assert [m["content"] for m in messages] == ["Weather in Paris?", "", "sunny"]
    error = refused(parse_chat, {"messages": [{"role": "user", "content": None}]})
    assert error.param == "messages[0].content"


async def test_tools_with_tool_choice_none_go_to_the_template_only():
    request = parse_chat({**CHAT, "tools": TOOLS, "tool_choice": "none"})
    assert request.chat_template_kwargs == {"tools": TOOLS}
    template = ("{% if tools %}{% for t in tools %}[tool {{ t['function']['name'] }}]{% endfor %}{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = synthetic_tokenizer(chat_template=template)
    with_tools = await chat_token_ids(tokenizer, request.messages, template_kwargs=request.chat_template_kwargs)
    assert tokenizer.decode(with_tools) == "[tool get_weather]hi"
    assert request.tool_calling is None  # no call is parsed


async def test_a_replayed_tool_call_history_reaches_the_template_with_its_calls_ids_and_names():
    """vLLM gives the chat template each message's ``name``, a tool message's ``tool_call_id`` and an assistant
    message's ``tool_calls`` (the arguments' JSON as an object, as templates index it); malformed ones are 400s."""
    history = [{**HISTORY[0], "name": "bob"},
               {**HISTORY[1], "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               HISTORY[2]]
    request = parse_chat({"messages": history, "tools": TOOLS, "tool_choice": "none"})
    template = ("{% for m in messages %}[{{ m['role'] }}{% if m['name'] %} {{ m['name'] }}{% endif %}"
                "{% for c in m['tool_calls'] or [] %} call {{ c['id'] }} {{ c['function']['name'] }}"
                "({{ c['function']['arguments']['city'] }}){% endfor %}"
                "{% if m['tool_call_id'] %} for {{ m['tool_call_id'] }}{% endif %}: {{ m['content'] }}]{% endfor %}")
    tokenizer = synthetic_tokenizer(chat_template=template)
    ids = await chat_token_ids(tokenizer, request.messages, template_kwargs=request.chat_template_kwargs)
    assert tokenizer.decode(ids) == ("[user bob: Weather in Paris?][assistant call c1 get_weather(Paris): ]"
                                     "[tool for c1: sunny]")
    # transformers' style (LLM.chat): the arguments already an object, or none
    for arguments, shown in (({"city": "Oslo"}, {"city": "Oslo"}), (None, {}), ("", {})):
        call = {"id": "c2", "type": "function", "function": {"name": "f", "arguments": arguments}}
        [_, message] = parse_chat({"messages": [HISTORY[0], {**HISTORY[1], "tool_calls": [call]}]}).messages
        assert message["tool_calls"][0]["function"]["arguments"] == shown
    deep = {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}
    assert refused(parse_chat, {"messages": [HISTORY[0], {**HISTORY[1], "tool_calls": [deep]}]}).param == \
        "messages[1].tool_calls[0].function.arguments"
    for bad, param in (({**HISTORY[1], "tool_calls": {"id": "c1"}}, "messages[1].tool_calls"),
                       ({**HISTORY[1], "tool_calls": [{"id": "c1"}]}, "messages[1].tool_calls[0]"),
                       ({**HISTORY[2], "tool_call_id": 7}, "messages[1].tool_call_id")):
        assert refused(parse_chat, {"messages": [HISTORY[0], bad]}).param == param


def test_a_logprob_count_of_zero_is_taken_where_vllm_takes_it():
    """vLLM refuses top_logprobs without logprobs, and prompt_logprobs on a stream, only for a count above 0."""
    assert parse_chat({**CHAT, "top_logprobs": 0}).num_logprobs is None
    assert parse_chat({**CHAT, "top_logprobs": 0, "logprobs": False}).num_logprobs is None
    assert refused(parse_chat, {**CHAT, "top_logprobs": 2}).param == "top_logprobs"
    streamed = parse_completion({"prompt": "hi", "prompt_logprobs": 0, "stream": True})
    assert streamed.is_stream and streamed.num_prompt_logprobs is None
    assert refused(parse_completion, {"prompt": "hi", "prompt_logprobs": 1, "stream": True}).param == "prompt_logprobs"


# ---- live ------------------------------------------------------------------------------------------------------
async def test_logit_bias_forces_and_bans_tokens_over_http(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    greedy = {"temperature": 0, "max_tokens": 4, "logprobs": 0,
              "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True}}
    plain = await openai_client.completions.create(model="tiny", prompt=PROMPT, **greedy)
    first = int(plain.choices[0].logprobs.tokens[0].removeprefix("token_id:"))
    forced_id = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    forced = await openai_client.completions.create(model="tiny", prompt=PROMPT, logit_bias={str(forced_id): 100},
                                                    **greedy)
    assert forced.choices[0].logprobs.tokens == [f"token_id:{forced_id}"] * 4
    banned = await openai_client.completions.create(model="tiny", prompt=PROMPT, logit_bias={str(first): -100},
                                                    **greedy)
    assert f"token_id:{first}" not in banned.choices[0].logprobs.tokens


async def test_a_logit_bias_id_outside_the_vocabulary_is_a_400(openai_client, tiny_model):
    openai = pytest.importorskip("openai")
    vocab_size = tiny_model[0].config.vocab_size
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.chat.completions.create(model="tiny", messages=CHAT["messages"],
                                                    logit_bias={str(vocab_size): 5})
    assert caught.value.body["param"] == "logit_bias"


async def test_min_p_1_samples_the_greedy_text(openai_client, tiny_model):
    model, tokenizer = tiny_model
    expected = reference_generate(model, tokenizer, tokenizer.encode(PROMPT),
                                  SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)).text
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                                      seed=3, extra_body={"ignore_eos": True, "min_p": 1.0})
    assert response.choices[0].text == expected


async def test_a_replayed_tool_history_with_tool_choice_none_is_served(openai_client):
    response = await openai_client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS,
                                                           tool_choice="none", max_tokens=3)
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.usage.completion_tokens >= 1
