"""AsyncLLM over a tiny in-process cluster: its text equals the reference engine's."""
from __future__ import annotations

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu", num_shards=0)
PROMPT = [318, 72, 101, 302, 111]  # "<|bos|>Hello"; greedy on random:tiny: "n", 217, "_", " h", "3", "L", "3", ...


async def _serve(params: SamplingParams):
    async with await AsyncLLM.start(ClusterConfig(**TINY)) as llm:
        return await llm.generate(PROMPT, params)


def _free_run(tiny_model):
    model, tokenizer = tiny_model
    return reference_generate(model, tokenizer, PROMPT, SamplingParams(temperature=0.0, max_tokens=12,
                                                                       ignore_eos=True))


async def test_stop_string_waits_for_min_tokens(tiny_model):
    """The 5th and the 7th tokens are "3": with min_tokens=5 the first is text of the first
    min_tokens tokens, which vLLM never searches, so the request stops on the second."""
    model, tokenizer = tiny_model
    free = _free_run(tiny_model)
    assert [tokenizer.decode([t]) for t in free.token_ids[4:7]] == ["3", "L", "3"]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5, stop=("3",), ignore_eos=True)
    ours = await _serve(params)
    reference = reference_generate(model, tokenizer, PROMPT, params)
    assert ours.token_ids == free.token_ids[:7] and ours.finish_reason == "stop"
    assert ours.text == tokenizer.decode(free.token_ids[:6]) and ours.text.endswith("3L")
    assert (reference.token_ids, reference.text, reference.finish_reason) == (ours.token_ids, ours.text, "stop")


async def test_stop_token_text_is_left_out(tiny_model):
    """A stop token id counts as a generated token but its text is not output (vLLM without
    include_stop_str_in_output), as in the reference engine."""
    model, tokenizer = tiny_model
    free = _free_run(tiny_model)
    stop_id = free.token_ids[4]  # "3", first seen at the 5th token
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_id,), ignore_eos=True)
    ours = await _serve(params)
    reference = reference_generate(model, tokenizer, PROMPT, params)
    assert ours.token_ids == free.token_ids[:5] and ours.finish_reason == "stop"
    assert ours.text == tokenizer.decode(free.token_ids[:4]) and "3" not in ours.text
    assert (reference.token_ids, reference.text, reference.finish_reason) == (ours.token_ids, ours.text, "stop")
