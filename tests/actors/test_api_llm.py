"""The synchronous ``LLM`` over a tiny in-process cluster: vLLM's call shapes, and no request left
decoding after a call fails or is interrupted."""
from __future__ import annotations

import asyncio
import gc
import json
import signal
import threading
import time
import warnings

import pytest

from api_helpers import LONG, PROMPT
from fastdecode.actors.api import LLM
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.executor import ExecutorConfig
from fastdecode.actors.executor_config import QueueFullError
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.request import Logprob, RequestError, SamplingParams
from fastdecode.cli.make_random_model import make_random_model
from test_prompt_logprobs import reference_logprobs

TINY = dict(seed=0, dtype="float32", device="cpu", num_shards=0)
GREEDY_FIELDS = dict(temperature=0.0, max_tokens=3, ignore_eos=True)
GREEDY = SamplingParams(**GREEDY_FIELDS)


@pytest.fixture(scope="module")
def llm():
    with LLM("random:tiny", **TINY) as started:
        yield started


def _is_idle(llm: LLM) -> bool:
    executor = llm._llm.cluster.executor
    return executor.num_running == 0 and executor.num_waiting == 0


def _until_idle(llm: LLM, timeout_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _is_idle(llm):
        assert time.monotonic() < deadline, "requests still decoding after the call ended"
        time.sleep(0.005)


def _llm_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "fastdecode-llm"}


def test_a_str_is_one_prompt(llm):
    (result,) = llm.generate("hello", GREEDY, use_tqdm=False)
    assert result.prompt == "hello" and result.prompt_token_ids == llm.tokenizer.encode("hello")
    assert len(result.token_ids) == 3 and result.outputs[0].text == result.text


def test_prompt_shapes(llm):
    (ids,) = llm.generate(PROMPT, GREEDY, use_tqdm=False)  # a flat list of ints: one token-id prompt
    assert ids.prompt_token_ids == PROMPT and ids.prompt is None and len(ids.token_ids) == 3
    batch = llm.generate([PROMPT, "hello", {"prompt_token_ids": PROMPT}, {"prompt": "hello"}], GREEDY,
                         show_progress=False)
    assert [r.prompt for r in batch] == [None, "hello", None, "hello"]
    assert batch[0].token_ids == batch[2].token_ids == ids.token_ids  # greedy: the same prompt, the same text
    assert batch[1].token_ids == batch[3].token_ids
    assert llm.generate([], GREEDY) == []


def test_one_sampling_params_per_prompt(llm):
    two = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    results = llm.generate([PROMPT, PROMPT], sampling_params=[GREEDY, two], use_tqdm=False)
    assert [len(r.outputs[0].token_ids) for r in results] == [3, 2]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompt"):
        llm.generate([PROMPT, PROMPT, PROMPT], [GREEDY, two])
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        llm.generate(PROMPT, {"max_tokens": 4})


def test_bad_prompt_in_a_batch_submits_nothing(llm):
    with pytest.raises(RequestError, match="prompt 1") as info:
        llm.generate([PROMPT, [10**6], PROMPT], LONG, use_tqdm=False)
    assert info.value.param == "prompt"
    assert _is_idle(llm)  # checked before any was submitted: nothing to cancel
    with pytest.raises(TypeError, match="integers"):
        llm.generate([PROMPT, [1, "x"]], LONG)
    assert _is_idle(llm)


def test_a_request_failing_after_submission_cancels_the_others(monkeypatch):
    """The third of four requests is refused at submission: the two already queued are cancelled before ``generate``
    raises, instead of decoding 1500 tokens in the background."""
    with LLM("random:tiny", **TINY) as llm:
        cluster = llm._llm.cluster
        submit, num_submitted = cluster.submit, []

        def third_refused(prompt_ids, params):
            num_submitted.append(1)
            if len(num_submitted) == 3:
                raise QueueFullError("too many requests waiting (2)")
            return submit(prompt_ids, params)

        monkeypatch.setattr(cluster, "submit", third_refused)
        with pytest.raises(QueueFullError):
            llm.generate([PROMPT] * 4, LONG, use_tqdm=False)
        _until_idle(llm, timeout_s=0.5)
        monkeypatch.setattr(cluster, "submit", submit)
        assert llm.generate(PROMPT, GREEDY)[0].finish_reason == "length"  # still serving


def test_a_batch_larger_than_the_queue_runs_to_its_end():
    """vLLM's LLM.generate takes any number of prompts: with a queue of 2, 7 prompts go in as earlier ones finish
    (they all used to be submitted at once, and the third failed the whole call)."""
    with LLM("random:tiny", executor=ExecutorConfig(max_queue=2), **TINY) as llm:
        outputs = llm.generate([PROMPT] * 7, GREEDY, use_tqdm=False)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [GREEDY.max_tokens] * 7


def test_n_samples_per_prompt_of_a_batch(llm):
    """vLLM's ``LLM.generate(prompts, SamplingParams(n=...))``: per prompt one result of n outputs, sample i the
    prompt's single request seeded seed + i; ``chat`` too."""
    sampled = dict(temperature=0.8, max_tokens=4, ignore_eos=True)
    results = llm.generate([PROMPT, "hello"], SamplingParams(n=3, seed=3, **sampled), use_tqdm=False)
    assert [[o.index for o in r.outputs] for r in results] == [[0, 1, 2]] * 2
    assert [r.prompt for r in results] == [None, "hello"]
    singles = llm.generate([PROMPT] * 3, [SamplingParams(seed=3 + i, **sampled) for i in range(3)], use_tqdm=False)
    assert [o.token_ids for o in results[0].outputs] == [s.token_ids for s in singles]
    [chat] = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(n=2, **sampled), use_tqdm=False)
    assert [len(o.token_ids) for o in chat.outputs] == [4, 4]


def test_n_samples_of_a_batch_larger_than_the_queue_run_to_its_end():
    """With a queue of 2, three prompts of n=2 go in one prompt's samples at a time (six at once were refused);
    n past the queue could never be admitted: refused before anything runs."""
    with LLM("random:tiny", executor=ExecutorConfig(max_queue=2), **TINY) as llm:
        outputs = llm.generate([PROMPT] * 3, SamplingParams(n=2, **GREEDY_FIELDS), use_tqdm=False)
        with pytest.raises(RequestError, match="n=3") as info:
            llm.generate([PROMPT], SamplingParams(n=3), use_tqdm=False)
    assert [[len(o.token_ids) for o in out.outputs] for out in outputs] == [[GREEDY.max_tokens] * 2] * 3
    assert info.value.param == "n"


def test_ctrl_c_cancels_the_calls_requests(llm):
    """A real SIGINT to the main thread while it waits in ``generate``."""
    assert threading.current_thread() is threading.main_thread()
    executor = llm._llm.cluster.executor
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 5.0
        while executor.num_running < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_running)
    try:
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            llm.generate([PROMPT] * 3, LONG, use_tqdm=False)
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    _until_idle(llm, timeout_s=0.5)  # cancelled: freed at the Executor's next step
    assert llm.generate(PROMPT, GREEDY)[0].finish_reason == "length"


def test_model_name_as_keyword_and_config_fields():
    with LLM(model="random:tiny", **TINY) as by_keyword:
        assert by_keyword._llm.cluster.config.model == "random:tiny"
    with LLM(model="random:tiny", config=ClusterConfig(model="random:smollm2", **TINY)) as overridden:
        assert overridden._llm.cluster.config.model == "random:tiny"


def test_bad_constructor_leaves_no_thread():
    before = _llm_threads()
    with pytest.raises(TypeError, match="unknown argument"):
        LLM("random:tiny", no_such_field=1)
    with pytest.raises(ModelError, match="unknown model"):
        LLM("no-such-model", **TINY)
    assert _llm_threads() == before


def test_closed_llm_says_so_without_warnings():
    llm = LLM("random:tiny", **TINY)
    llm.close()
    llm.close()  # twice is fine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="LLM is closed"):
            llm.generate("hello")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_requests_without_params_take_the_models_generation_config(tmp_path):
    """vLLM's LLM.generate(sampling_params=None): the model's generation_config.json values, not SamplingParams()."""
    make_random_model("tiny", 0, tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(
        json.dumps({**generation, "temperature": 0.7, "top_k": 1, "max_new_tokens": 5}))
    with LLM(str(tmp_path), **TINY) as llm:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.7, 1, 5)
        [result] = llm.generate([PROMPT], show_progress=False)
        # top_k 1 at temperature 0.7 is the greedy choice; max_new_tokens is the length
        greedy = SamplingParams(temperature=0.0, max_tokens=5)
        [reference] = llm.generate([PROMPT], greedy, show_progress=False)
        assert len(reference.token_ids) == 5 and result.token_ids == reference.token_ids
        explicit = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0), show_progress=False)
        assert len(explicit[0].token_ids) <= 2


def test_submit_without_params_runs_the_defaults(llm):
    """AsyncLLM.submit (several choices at once) with params None: the model's defaults, as stream() takes them."""
    async def run():
        stream = llm._llm.submit(PROMPT, None)
        try:
            return [out async for out in stream]
        finally:
            await stream.aclose()
    outputs = llm._call(run())
    assert len([o for o in outputs if o.token_id >= 0]) == llm.get_default_sampling_params().max_tokens or \
        outputs[-1].finish_reason == "stop"


def test_results_carry_vllms_request_id_cumulative_logprob_and_prompt_logprobs(llm):
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)
    first, second = llm.generate([PROMPT, PROMPT], [with_logprobs, GREEDY], use_tqdm=False)
    completion = first.outputs[0]
    assert len(first.logprobs) == 3 and completion.cumulative_logprob == pytest.approx(sum(first.logprobs))
    assert completion.cumulative_logprob <= 0.0
    # logprobs=0: vLLM's per-position dicts hold the sampled token alone
    assert [list(position) for position in completion.logprobs] == [[t] for t in completion.token_ids]
    # no logprobs asked: None, as vLLM (though its batch-mate asked, so the engine computed them)
    assert second.outputs[0].cumulative_logprob is None and second.outputs[0].logprobs is None
    assert first.request_id.isdigit() and second.request_id.isdigit() and first.request_id != second.request_id
    assert first.prompt_logprobs is None and first.finished


def test_logprobs_read_as_vllms_per_position_dicts(llm, tiny_model):
    """vLLM's ``CompletionOutput.logprobs``: per generated token {token id: Logprob} of the sampled token (first),
    then of the N most likely there, ranked from 1, each with its text; the sampled one's logprob is the float
    GenerationResult.logprobs keeps. Greedy: the sampled token is the likeliest, rank 1."""
    _, tokenizer = tiny_model
    [result] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3),
                            use_tqdm=False)
    positions = result.outputs[0].logprobs
    assert len(positions) == 4
    for token_id, logprob, position in zip(result.token_ids, result.logprobs, positions):
        assert next(iter(position)) == token_id and len(position) == 3
        assert position[token_id].logprob == pytest.approx(logprob) and position[token_id].rank == 1
        assert sorted(entry.rank for entry in position.values()) == [1, 2, 3]
        assert all(entry.decoded_token == tokenizer.token_text(t) for t, entry in position.items())
        assert max(entry.logprob for entry in position.values()) == pytest.approx(logprob)


def test_a_sampled_token_has_its_rank_in_the_whole_distribution(llm, tiny_model):
    """vLLM gives the sampled token's rank even where it is not among the top N: 1 + the tokens likelier than it
    in the raw distribution (here scored again by the model's full forward pass over prompt and output)."""
    model, _ = tiny_model
    params = SamplingParams(temperature=3.0, seed=7, max_tokens=12, ignore_eos=True, logprobs=1)
    [result] = llm.generate([PROMPT], params, use_tqdm=False)
    ref = reference_logprobs(model, PROMPT + result.token_ids[:-1])
    ranks = []
    for step, (token_id, position) in enumerate(zip(result.token_ids, result.outputs[0].logprobs)):
        row = ref[len(PROMPT) - 1 + step]
        rank = position[token_id].rank
        assert int((row > row[token_id] + 1e-4).sum()) < rank <= int((row > row[token_id] - 1e-4).sum()) + 1
        ranks.append(rank)
    assert max(ranks) > 1  # at this temperature some tokens come from outside the top one


def test_the_engine_seed_makes_unseeded_sampling_repeat_whatever_the_app_does_with_torch():
    """vLLM's ``seed``: requests without a seed of their own draw from the engine's generator, so an LLM started
    with the same seed samples the same tokens (however the app seeds or draws from torch's default generator),
    and another seed samples others."""
    import torch

    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True)
    outputs = []
    for seed, app_seed in ((3, 1), (3, 2), (4, 1)):
        torch.manual_seed(app_seed)
        with LLM("random:tiny", **{**TINY, "seed": seed}) as llm:
            torch.rand(7)
            outputs.append([r.token_ids for r in llm.generate([PROMPT, PROMPT], params, use_tqdm=False)])
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    assert outputs[0][0] != outputs[0][1]  # two requests of one call draw different tokens


def test_prompt_logprobs_read_as_vllms(llm, tiny_model):
    """vLLM's ``RequestOutput.prompt_logprobs``: None first, then per prompt token {token id: Logprob} of that token
    (first) and of the top ones, as the model's full forward pass scores them; None where not asked."""
    model, tokenizer = tiny_model
    asked = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    result, plain = llm.generate([PROMPT, PROMPT], [asked, GREEDY], use_tqdm=False)
    assert plain.prompt_logprobs is None
    shown, ref = result.prompt_logprobs, reference_logprobs(model, PROMPT)
    assert len(shown) == len(PROMPT) and shown[0] is None
    for position in range(1, len(PROMPT)):
        entries, row = shown[position], ref[position - 1]
        assert next(iter(entries)) == PROMPT[position] and 2 <= len(entries) <= 3
        for token_id, logprob in entries.items():
            assert isinstance(logprob, Logprob)
            assert logprob.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
            assert logprob.decoded_token == tokenizer.decode([token_id], skip_special_tokens=False)
        assert sorted(lp.rank for lp in entries.values() if lp.rank <= 2) == [1, 2]


def test_max_tokens_none_generates_to_the_end_of_the_context():
    """vLLM's ``SamplingParams(max_tokens=None)``: no output limit but the context."""
    with LLM("random:tiny", max_model_len=24, **TINY) as llm:
        [result] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
                                use_tqdm=False)
    assert len(result.token_ids) == 24 - len(PROMPT) and result.finish_reason == "length"


def test_vllm_engine_keywords_go_into_the_nested_configs():
    with LLM("random:tiny", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, **TINY) as llm:
        executor = llm._llm.cluster.config.executor
        assert (executor.max_model_len, executor.max_num_batched_tokens, executor.max_num_seqs) == (64, 32, 4)
        assert llm._llm.max_model_len == 64
        with pytest.raises(RequestError, match="context is 64"):
            llm.generate([PROMPT * 13], GREEDY)  # 65 tokens
    with pytest.raises(TypeError, match="unknown argument.*swap_space.*max_num_seqs"):
        LLM("random:tiny", swap_space=4, **TINY)
    with LLM("random:tiny", gpu_memory_utilization=0.9, **TINY) as llm:  # vLLM's; sizes a CUDA device's GPU pool
        assert llm._llm.cluster.config.gpu_memory_utilization == 0.9


def test_get_tokenizer_and_chat_take_the_servers_chat_template(llm):
    tokenizer = llm.get_tokenizer()
    assert tokenizer is llm.tokenizer
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    (result,) = llm.chat(conversation, GREEDY, use_tqdm=False)
    # the server's chat route: Tokenizer.encode_chat with no special tokens added (the template writes them)
    assert result.prompt_token_ids == tokenizer.encode_chat(conversation, add_special_tokens=False)
    assert result.prompt == tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    (same,) = llm.generate({"prompt_token_ids": result.prompt_token_ids}, GREEDY, use_tqdm=False)
    assert result.token_ids == same.token_ids and len(result.token_ids) == 3
    batch = llm.chat([conversation, [{"role": "user", "content": "bye"}]], sampling_params=GREEDY, use_tqdm=False)
    assert len(batch) == 2 and batch[0].prompt_token_ids == result.prompt_token_ids
    assert batch[1].prompt_token_ids != result.prompt_token_ids
    with pytest.raises(RequestError, match=r"messages\[0\].role") as info:
        llm.chat([{"content": "no role"}], GREEDY)
    assert info.value.param == "messages[0].role"
    with pytest.raises(TypeError, match="messages must be"):
        llm.chat("hello", GREEDY)


def test_a_logit_bias_outside_the_vocabulary_is_refused_before_any_prompt_runs(llm):
    """Only the HTTP route checked the ids; the Python API ran the request and the bias was dropped unsaid."""
    from fastdecode.actors.model.presets import PRESETS

    vocab_size = PRESETS["tiny"].vocab_size
    bad = SamplingParams(max_tokens=2, logit_bias={vocab_size: 5.0})
    with pytest.raises(RequestError, match=f"logit_bias token id {vocab_size} is outside the vocabulary") as refused:
        llm.generate(["hello", "there"], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    assert refused.value.param == "logit_bias"


def test_async_generate_tokenizes_text_off_the_loop_and_refuses_text_past_the_context_first(monkeypatch):
    """AsyncLLM.generate's loop also runs the Executor: a text prompt is tokenized on a worker thread, and text longer
    than the context could hold is refused before it is tokenized."""
    from fastdecode.actors.async_llm import AsyncLLM

    async def run():
        async with await AsyncLLM.start(ClusterConfig(model="random:tiny", **TINY)) as llm:
            threads = []
            encode = llm.tokenizer.encode
            monkeypatch.setattr(llm.tokenizer, "encode",
                                lambda *a, **k: threads.append(threading.current_thread()) or encode(*a, **k))
            result = await llm.generate("hello there", GREEDY)
            assert len(result.token_ids) == GREEDY.max_tokens
            assert threads and threading.main_thread() not in threads
            with pytest.raises(RequestError, match="characters") as info:
                await llm.generate("a" * (llm.max_prompt_chars + 1), GREEDY)
            assert info.value.param == "prompt" and len(threads) == 1
            result = await llm.generate({"prompt": "hi", "prompt_token_ids": PROMPT}, GREEDY)  # ids run, no tokenizing
            assert len(threads) == 1 and result.prompt == "hi"
            outputs = [out async for out in llm.stream("hello there", GREEDY)]  # stream() too
            assert sum(out.token_id >= 0 for out in outputs) == GREEDY.max_tokens
            assert len(threads) == 2 and threading.main_thread() not in threads
            with pytest.raises(RequestError, match="characters"):
                async for _ in llm.stream("a" * (llm.max_prompt_chars + 1), GREEDY):
                    pass
            assert len(threads) == 2

    asyncio.run(run())
