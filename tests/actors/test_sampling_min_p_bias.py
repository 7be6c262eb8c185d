"""min_p and logit_bias in the batched sampler (vLLM/OpenAI meanings), and their checks in SamplingParams."""
from __future__ import annotations

import math

import pytest
import torch

from fastdecode.actors.request import RequestError, SamplingParams
from fastdecode.actors.sampling import SamplingRow, make_generator, sample

VOCAB = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def _row(params: SamplingParams) -> SamplingRow:
    return SamplingRow(params, [1, 2, 3], [], make_generator(params.seed, "cpu"))


def test_min_p_1_draws_only_the_best_token():
    logits = _logits(8, seed=3)
    rows = [_row(SamplingParams(temperature=1.5, min_p=1.0, seed=seed)) for seed in range(8)]
    for _ in range(20):
        assert torch.equal(sample(logits, rows).token_ids, logits.argmax(-1))


def test_min_p_drops_tokens_below_its_share_of_the_best_after_temperature():
    # probabilities 0.4, 0.3, 0.2, 0.1 at temperature 1; min_p 0.6 keeps those of at least 0.24
    logits = torch.full((1, VOCAB), -1e9)
    logits[0, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    drawn = {int(sample(logits, [_row(SamplingParams(min_p=0.6, seed=seed))]).token_ids[0]) for seed in range(200)}
    assert drawn == {0, 1}
    # at temperature 2 the probabilities flatten (0.2 is 0.71 of the best's): token 2 comes back
    hot = {int(sample(logits, [_row(SamplingParams(temperature=2.0, min_p=0.6, seed=s))]).token_ids[0])
           for s in range(200)}
    assert hot == {0, 1, 2}


def test_min_p_leaves_the_rows_that_do_not_ask_alone():
    logits = torch.full((2, VOCAB), -1e9)
    logits[:, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    rows = [_row(SamplingParams(min_p=0.6, seed=1)), _row(SamplingParams(seed=2))]
    drawn = [set(), set()]
    for _ in range(300):
        for index, token_id in enumerate(sample(logits, rows).token_ids.tolist()):
            drawn[index].add(token_id)
    assert drawn == [{0, 1}, {0, 1, 2, 3}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_bias_of_100_forces_a_token_and_minus_100_bans_it(temperature):
    logits = _logits(3, seed=5)
    best = logits.argmax(-1)
    forced = int(logits[0].argmin())
    rows = [_row(SamplingParams(temperature=temperature, seed=1, logit_bias={forced: 100})),
            _row(SamplingParams(temperature=0.0, logit_bias={int(best[1]): -100})),
            _row(SamplingParams(temperature=0.0))]
    out = sample(logits, rows)
    second = int(logits[1].topk(2).indices[1])
    assert out.token_ids.tolist() == [forced, second, int(best[2])]


def test_logprobs_stay_those_of_the_model_under_a_bias():
    logits = _logits(1, seed=9)
    token_id = int(logits[0].argmin())
    out = sample(logits, [_row(SamplingParams(temperature=0.0, logprobs=0, logit_bias={token_id: 100}))])
    assert int(out.token_ids[0]) == token_id
    assert float(out.logprobs[0]) == pytest.approx(float(logits[0].log_softmax(-1)[token_id]), abs=1e-5)


def test_a_biased_greedy_row_is_not_a_plain_argmax():
    assert _row(SamplingParams(temperature=0.0)).is_argmax
    assert not _row(SamplingParams(temperature=0.0, logit_bias={3: 1.0})).is_argmax
    assert _row(SamplingParams(temperature=0.0, min_p=0.5)).is_argmax  # min_p always keeps the best token


def test_logit_bias_is_stored_as_sorted_pairs():
    assert SamplingParams(logit_bias={7: -2, 3: 1.5}).logit_bias == ((3, 1.5), (7, -2.0))
    assert SamplingParams(logit_bias=None).logit_bias == ()


@pytest.mark.parametrize("fields, param", [
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"), ({"min_p": math.nan}, "min_p"),
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {1: -100.5}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"), ({"logit_bias": {"1": 1}}, "logit_bias"),
    ({"logit_bias": {1: True}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias")])
def test_bad_values_are_refused(fields, param):
    with pytest.raises(RequestError) as caught:
        SamplingParams(**fields)
    assert caught.value.param == param


def test_large_biases_on_several_rows_add_exactly_what_they_say():
    """Biases over much of the vocabulary (the whole of it on one row), none on another: each row's logits move by
    its own biases, ids past the vocabulary left out; greedy rows then take the biased argmax."""
    from fastdecode.actors.sampling import _add_logit_bias

    vocab, gen = 300, torch.Generator().manual_seed(0)
    dense = [torch.zeros(vocab), torch.zeros(vocab), torch.zeros(vocab)]
    biases = [{t: float(torch.randint(-100, 101, (), generator=gen)) for t in range(vocab + 5)},  # 5 past it
              {}, {t: 3.5 for t in range(0, vocab, 7)}]
    for row, bias in zip(dense, biases):
        for token_id, value in bias.items():
            if token_id < vocab:
                row[token_id] = value
    rows = [SamplingRow(SamplingParams(temperature=0.0, logit_bias=bias), [1], []) for bias in biases]
    logits = torch.randn(3, vocab, generator=gen)
    biased = logits.clone()
    _add_logit_bias(biased, rows)
    torch.testing.assert_close(biased, logits + torch.stack(dense), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_batch_picks_what_the_cpu_picks():
    """The GPU sampler (its host lists and bias tensors uploaded pinned and asynchronously) against the CPU one on the
    same logits: biases, penalties, min_tokens masking, greedy rows and rows whose filters leave one token."""
    vocab = 4000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(11)) * 3
    wide_bias = {t: float((t * 37) % 201 - 100) for t in range(0, vocab, 3)}

    def rows(device: str) -> list[SamplingRow]:
        params = [SamplingParams(temperature=0.0, logit_bias=wide_bias, logprobs=3),
                  SamplingParams(temperature=0.0, repetition_penalty=1.7, frequency_penalty=0.5, logprobs=0),
                  SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[int(logits[2].argmax())]),
                  SamplingParams(temperature=1.3, top_k=1, seed=5, logit_bias={17: 60}),
                  SamplingParams(temperature=0.8, min_p=1.0, seed=6, presence_penalty=1.0),
                  SamplingParams(temperature=0.0)]
        history = [int(t) for t in logits[1].topk(5).indices]  # the penalties hit row 1's best tokens
        return [SamplingRow(p, [1, 2, *history], history[:2], make_generator(p.seed, device)) for p in params]

    on_cpu = sample(logits, rows("cpu"))
    on_gpu = sample(logits.cuda(), rows("cuda"))
    assert on_gpu.token_ids.device.type == "cuda"
    assert on_gpu.token_ids.tolist() == on_cpu.token_ids.tolist()
    assert on_cpu.token_ids[3] == 17 and on_cpu.token_ids[2] != logits[2].argmax()
    torch.testing.assert_close(on_gpu.logprobs.cpu(), on_cpu.logprobs, rtol=0, atol=1e-4)
    assert on_gpu.top_token_ids.tolist() == on_cpu.top_token_ids.tolist()
