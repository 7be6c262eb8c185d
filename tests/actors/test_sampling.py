"""The batched sampler: greedy, seeds independent of the batch, top-k/top-p, penalties, min_tokens, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from fastdecode.actors.request import SamplingParams
from fastdecode.actors.sampling import SamplingRow, make_generator, sample

VOCAB = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def _row(params: SamplingParams, output=(), prompt=(1, 2, 3)) -> SamplingRow:
    return SamplingRow(params, list(prompt), list(output), make_generator(params.seed, "cpu"))


def test_greedy_is_argmax():
    logits = _logits(4)
    out = sample(logits, [_row(SamplingParams(temperature=0.0)) for _ in range(4)])
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_seeded_request_does_not_depend_on_batch_company():
    target = _logits(1, seed=7)[0]
    params = SamplingParams(temperature=1.0, seed=1234)
    alone_row = _row(params)
    alone = [int(sample(target[None], [alone_row]).token_ids[0]) for _ in range(20)]
    crowded_row = _row(params)
    crowded = []
    for step in range(20):
        others = _logits(5, seed=100 + step)
        batch = torch.cat([others[:2], target[None], others[2:]])
        rows = [_row(SamplingParams(temperature=0.8)), _row(SamplingParams(temperature=1.0, seed=step)),
                crowded_row, _row(SamplingParams(temperature=0.0)), _row(SamplingParams(temperature=1.3, top_k=3)),
                _row(SamplingParams(temperature=0.7, top_p=0.5))]
        crowded.append(int(sample(batch, rows).token_ids[2]))
    assert alone == crowded
    assert len(set(alone)) > 1, "20 draws at temperature 1 should not all be one token"
    other_seed = _row(SamplingParams(temperature=1.0, seed=99))
    assert [int(sample(target[None], [other_seed]).token_ids[0]) for _ in range(20)] != alone


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * (VOCAB - 3)]))
    row = _row(SamplingParams(temperature=1.0, seed=0))
    counts = torch.zeros(VOCAB)
    for _ in range(3000):
        counts[sample(logits, [row]).token_ids[0]] += 1
    freq = counts[:3] / 3000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04), freq


def test_top_k_keeps_only_the_k_best():
    logits = _logits(1, seed=3)
    best3 = set(logits[0].topk(3).indices.tolist())
    row = _row(SamplingParams(temperature=5.0, top_k=3, seed=1))
    drawn = {int(sample(logits, [row]).token_ids[0]) for _ in range(300)}
    assert drawn == best3


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (VOCAB - 4)) + 1e-12
    logits = probs.log()[None]
    row = _row(SamplingParams(temperature=1.0, top_p=0.65, seed=2))  # 0.4 + 0.3 >= 0.65: keep two
    drawn = {int(sample(logits, [row]).token_ids[0]) for _ in range(300)}
    assert drawn == {0, 1}
    tiny_p = _row(SamplingParams(temperature=1.0, top_p=0.01, seed=2))  # always keeps the best one
    assert {int(sample(logits, [tiny_p]).token_ids[0]) for _ in range(50)} == {0}


def test_top_k_and_top_p_rows_mix_in_one_batch():
    logits = _logits(3, seed=5)
    rows = [_row(SamplingParams(temperature=1.0, top_k=1, seed=1)),
            _row(SamplingParams(temperature=1.0, top_p=1e-6, seed=1)),
            _row(SamplingParams(temperature=0.0))]
    for _ in range(20):
        assert torch.equal(sample(logits, rows).token_ids, logits.argmax(-1))


def test_presence_and_frequency_penalties_are_exact():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 1.0
    logits[0, 9] = 0.82

    def pick(output, presence=0.0, frequency=0.0):
        params = SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
        return int(sample(logits, [_row(params, output=output)]).token_ids[0])

    assert pick([7, 7, 7], presence=0.1) == 7  # 1.0 - 0.1 = 0.9: presence does not grow with the count
    assert pick([7], frequency=0.05) == 7  # 0.95
    assert pick([7, 7, 7, 7], frequency=0.05) == 9  # 1.0 - 4 * 0.05 = 0.8 < 0.82
    assert pick([7], presence=0.1, frequency=0.05) == 7  # 0.85
    assert pick([7, 7, 7], presence=0.1, frequency=0.05) == 9  # 0.75
    assert pick([], presence=2.0, frequency=2.0) == 7  # nothing generated yet: no penalty


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 4] = 2.0
    logits[0, 5] = 1.5
    logits[0, 6] = -0.1
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # 4 is in the prompt: 2.0 / 2 = 1.0 < 1.5
    assert int(sample(logits, [_row(params, prompt=[4])]).token_ids[0]) == 5
    logits2 = torch.full((1, VOCAB), -5.0)
    logits2[0, 6] = -0.1
    logits2[0, 8] = -0.15
    # 6 was generated: -0.1 * 2 = -0.2 < -0.15
    assert int(sample(logits2, [_row(params, output=[6], prompt=[])]).token_ids[0]) == 8


def test_a_rows_prompt_becomes_a_tensor_once_across_steps():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    row = _row(params, prompt=list(range(4, 40)))
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 4], logits[0, 40] = 2.0, 1.5
    assert int(sample(logits.clone(), [row]).token_ids[0]) == 40  # 4 is in the prompt: 2.0 / 2 < 1.5
    first = row.prompt_tensor
    assert int(sample(logits.clone(), [row]).token_ids[0]) == 40
    assert row.prompt_tensor is first and first.tolist() == list(range(4, 40))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0  # EOS is the clear favourite
    logits[0, 3] = 9.0  # then a stop token id
    params = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=5, stop_token_ids=(3,))
    assert int(sample(logits, [_row(params, output=[11])], eos_token_ids=(2,)).token_ids[0]) not in (2, 3)
    assert int(sample(logits, [_row(params, output=[11, 12])], eos_token_ids=(2,)).token_ids[0]) == 2
    # ignore_eos changes stopping only: EOS stays masked until min_tokens (vLLM's min_tokens processor), then may come
    ignoring = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=5, ignore_eos=True)
    assert int(sample(logits, [_row(ignoring, output=[])], eos_token_ids=(2,)).token_ids[0]) == 3
    assert int(sample(logits, [_row(ignoring, output=[11, 12])], eos_token_ids=(2,)).token_ids[0]) == 2


def test_top_p_one_masks_nothing_beside_a_row_that_filters():
    """A row with top_p 1 keeps its whole distribution when a batch-mate's top-p or top-k makes the batch filter: the
    float cumsum over a large vocabulary passes 1.0 before its tail, which must not be cut (else a seeded row's
    tokens would depend on its batch)."""
    from fastdecode.actors.sampling import _top_k_top_p_mask

    logits = torch.randn(4, 128_256, generator=torch.Generator().manual_seed(3))
    mask = _top_k_top_p_mask(logits, [0, 0, 0, 5], [1.0, 0.5, 1.0, 1.0])
    assert not mask[0].any() and not mask[2].any()
    assert mask[1].any() and int((~mask[3]).sum()) == 5


def test_logprobs_are_of_the_raw_distribution():
    logits = _logits(2, seed=9)
    rows = [_row(SamplingParams(temperature=0.0, logprobs=3)),
            _row(SamplingParams(temperature=0.5, logprobs=0, seed=4))]
    out = sample(logits, rows)
    raw = logits.log_softmax(-1)
    for i in range(2):
        assert math.isclose(float(out.logprobs[i]), float(raw[i, out.token_ids[i]]), rel_tol=1e-6)
    assert out.top_token_ids.shape == (2, 3)
    assert torch.equal(out.top_token_ids[0], raw[0].topk(3).indices)
    assert out.top_token_ids[0, 0] == out.token_ids[0]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.zeros(3, VOCAB), [_row(SamplingParams())])


def test_only_plain_greedy_rows_take_the_argmax_path():
    output: list[int] = [7]
    waiting = _row(SamplingParams(temperature=0.0, min_tokens=2, max_tokens=5), output=output)
    waiting.output_token_ids = output  # the live list the Executor appends to
    assert _row(SamplingParams(temperature=0.0)).is_argmax
    assert not waiting.is_argmax  # min_tokens not reached: EOS must still be masked
    output.append(8)
    assert waiting.is_argmax
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.0, logprobs=2),
                   SamplingParams(temperature=0.0, presence_penalty=0.5),
                   SamplingParams(temperature=0.0, frequency_penalty=0.5),
                   SamplingParams(temperature=0.0, repetition_penalty=1.2)):
        assert not _row(params).is_argmax, params


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_temperature_below_the_epsilon_is_greedy(temperature):
    """1e-300 is 0 in float32: dividing by it gave NaN probabilities and token 0 every step."""
    logits = _logits(3, seed=11)
    tiny = SamplingParams(temperature=temperature, seed=5)
    # beside a sampled row, and with logprobs: the path that uploads the temperatures
    rows = [_row(tiny), _row(SamplingParams(temperature=1.0, seed=1)),
            _row(SamplingParams(temperature=temperature, logprobs=1))]
    greedy = [_row(SamplingParams(temperature=0.0)), _row(SamplingParams(temperature=1.0, seed=1)),
              _row(SamplingParams(temperature=0.0, logprobs=1))]
    for _ in range(5):
        out, expected = sample(logits, rows), sample(logits, greedy)
        assert torch.equal(out.token_ids, expected.token_ids)  # the seeded middle row too
        assert torch.equal(out.token_ids[[0, 2]], logits[[0, 2]].argmax(-1))
        assert torch.isfinite(out.logprobs).all()
    assert tiny.is_greedy and _row(tiny).is_argmax
    assert not SamplingParams(temperature=1e-5).is_greedy
