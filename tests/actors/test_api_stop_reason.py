"""``stop_reason`` where the stop is found: the embedding API's stream sets it from the engine's stop token or
the detokenizer's stop string (vLLM's rules), and ``generate`` results carry it.  A scripted engine stands in
for the cluster: it emits the tokens given and stops where told, so no model runs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastdecode.actors.api import AsyncLLM, primary_eos_token_id
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.model.synthetic_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID
from fastdecode.actors.model.tokenizer import Tokenizer
from fastdecode.actors.request import SamplingParams, TokenEvent
from synthetic_tokenizers import synthetic_tokenizer

SECOND_EOS = BOS_TOKEN_ID  # a generation_config EOS id other than the tokenizer's own (e.g. Llama-3's <|eot_id|>)


class ScriptedRequest:
    request_id = 1  # the engine's id (RequestStream's), which its events carry

    def __init__(self, token_ids: list[int], finish_reason: str) -> None:
        self._token_ids = token_ids
        self._finish_reason = finish_reason
        self.cancels: list[bool] = []

    async def __aiter__(self):
        for index, token_id in enumerate(self._token_ids):
            is_last = index == len(self._token_ids) - 1
            yield TokenEvent(self.request_id, token_id, index, finish_reason=self._finish_reason if is_last else None)

    def cancel(self, is_stop: bool = False) -> None:
        self.cancels.append(is_stop)


class ScriptedCluster:
    """What ``AsyncLLM`` reads of a cluster; ``submit`` plays the next script."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.model = SimpleNamespace(config=SimpleNamespace(sampling_defaults=SamplingDefaults()))
        self.executor = SimpleNamespace(max_model_len=256, config=SimpleNamespace(max_queue=1))
        self.script: tuple[list[int], str] = ([], "length")

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> ScriptedRequest:
        return ScriptedRequest(*self.script)

    async def stop(self) -> None:
        self.script = ([], "length")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return synthetic_tokenizer(eos_token_ids=(EOS_TOKEN_ID, SECOND_EOS))


async def run(tokenizer: Tokenizer, token_ids: list[int], finish_reason: str, params: SamplingParams):
    cluster = ScriptedCluster(tokenizer)
    cluster.script = (token_ids, finish_reason)
    llm = AsyncLLM(cluster)
    outputs = [out async for out in llm.stream([5, 6], params)]
    result = await llm.generate([5, 6], params)
    await llm.stop()  # an AsyncLLM collected unstopped warns
    assert result.stop_reason == outputs[-1].stop_reason == result.outputs[0].stop_reason
    assert all(out.stop_reason is None for out in outputs[:-1])
    return outputs[-1], result


def test_the_primary_eos_is_the_tokenizers_own(tokenizer):
    assert primary_eos_token_id(tokenizer) == EOS_TOKEN_ID
    assert primary_eos_token_id(SimpleNamespace()) is None


async def test_stop_token_and_eos_ids(tokenizer):
    words = tokenizer.encode(" of France", add_special_tokens=False)
    stop_id = tokenizer.encode(" and", add_special_tokens=False)[0]
    with_stop_id = SamplingParams(stop_token_ids=(stop_id,))
    last, result = await run(tokenizer, [*words, stop_id], "stop", with_stop_id)
    assert (last.finish_reason, last.stop_reason) == ("stop", stop_id) and result.token_ids[-1] == stop_id
    # the tokenizer's EOS: None (vLLM); another generation_config EOS id is a stop token id there: the id
    assert (await run(tokenizer, [*words, EOS_TOKEN_ID], "stop", with_stop_id))[0].stop_reason is None
    assert (await run(tokenizer, [*words, SECOND_EOS], "stop", with_stop_id))[0].stop_reason == SECOND_EOS
    # ignore_eos with EOS among the stop token ids: it stopped as a stop token
    ignoring = SamplingParams(ignore_eos=True, stop_token_ids=(EOS_TOKEN_ID,))
    assert (await run(tokenizer, [*words, EOS_TOKEN_ID], "stop", ignoring))[0].stop_reason == EOS_TOKEN_ID
    last, result = await run(tokenizer, words, "length", with_stop_id)
    assert (last.finish_reason, last.stop_reason, result.stop_reason) == ("length", None, None)


async def test_the_stop_string_that_matched(tokenizer):
    words = tokenizer.encode(" of France is Paris", add_special_tokens=False)
    # " of" begins first: it is the one that matched, though listed last
    last, result = await run(tokenizer, words, "length", SamplingParams(stop=("France", "Paris", " of")))
    assert (last.finish_reason, last.stop_reason, result.text) == ("stop", " of", "")
    last, result = await run(tokenizer, words, "length", SamplingParams(stop=("Paris", "France")))
    assert (last.stop_reason, result.text, result.outputs[0].stop_reason) == ("France", " of ", "France")
    assert "stop_reason='France'" in repr(result.outputs[0])
