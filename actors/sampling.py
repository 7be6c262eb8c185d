"""Batched token sampling over logits[B, V] with per-row ``SamplingParams``.

Order per row (vLLM's): min_tokens masks EOS/stop ids; tokens outside ``allowed_token_ids`` and those the bad
words ban are masked, then those a structured output's grammar does not allow next; the logit bias is added;
repetition, frequency and presence penalties; greedy rows take the argmax here;
others divide by the temperature, drop what min_p drops (tokens less likely than
min_p times the best one), keep the top-k then the top-p nucleus, and draw with the row's own
``torch.Generator`` when it has a seed, so a seeded request's tokens never depend
on what else is in the batch.  Logprobs are those of the raw model distribution.
A batch of plain greedy rows (``SamplingRow.is_argmax``) is one argmax kernel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fastdecode.actors.request import SamplingParams
from fastdecode.actors.structured_output import apply_bitmasks
from fastdecode.actors.tensor_io import upload


@dataclass
class SamplingRow:
    """What the sampler needs of one running request (the engine keeps it across steps)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    matcher: Any = None  # the request's GrammarMatcher where it has structured outputs (structured_output.py)
    _prompt_tensor: torch.Tensor | None = field(default=None, init=False, repr=False)
    _bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _allowed_tensor: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def prompt_tensor(self) -> torch.Tensor:
        """The prompt's ids as an int64 host tensor, made once: the prompt never changes, and turning a
        long prompt's Python ints into a tensor at every step held the whole batch up (repetition penalty)."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.as_tensor(list(self.prompt_token_ids), dtype=torch.int64)
        return self._prompt_tensor

    @property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``logit_bias`` as host tensors (token ids int64, biases float32), made once: a bias over much of
        the vocabulary walked as Python pairs at every step took 34 ms a row on a 49k vocabulary."""
        if self._bias_tensors is None:
            pairs = self.params.logit_bias
            self._bias_tensors = (torch.tensor([t for t, _ in pairs], dtype=torch.int64),
                                  torch.tensor([b for _, b in pairs], dtype=torch.float32))
        return self._bias_tensors

    @property
    def allowed_tensor(self) -> torch.Tensor:
        """The ``allowed_token_ids`` as an int64 host tensor, made once (the bias's reason)."""
        if self._allowed_tensor is None:
            self._allowed_tensor = torch.tensor(self.params.allowed_token_ids or (), dtype=torch.int64)
        return self._allowed_tensor

    def banned_token_ids(self) -> list[int]:
        """vLLM's bad words at this step: the last token of each of the ``bad_words`` token sequences whose other
        tokens end the output so far (a one-token word is always banned)."""
        output = self.output_token_ids
        banned = []
        for word in self.params.bad_words_token_ids:
            prefix = len(word) - 1
            if prefix <= len(output) and (prefix == 0 or list(output[-prefix:]) == list(word[:-1])):
                banned.append(word[-1])
        return banned

    def __post_init__(self) -> None:
        p = self.params
        # greedy with nothing that changes the logits or asks for logprobs (min_tokens aside; min_p always keeps
        # the best token)
        self._is_plain_greedy = (p.is_greedy and p.logprobs is None and p.repetition_penalty == 1.0
                                 and not p.frequency_penalty and not p.presence_penalty and not p.logit_bias
                                 and p.allowed_token_ids is None and not p.bad_words_token_ids
                                 and self.matcher is None)

    @property
    def is_argmax(self) -> bool:
        """This step's token is the plain argmax of the row's logits: greedy, no penalty,
        no logprobs, and no ``min_tokens`` mask left."""
        return self._is_plain_greedy and len(self.output_token_ids) >= self.params.min_tokens


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] raw logprob of the chosen token
    ranks: torch.Tensor | None = None  # [B] the chosen token's rank in the raw distribution (1: the likeliest)
    top_token_ids: torch.Tensor | None = None  # [B, N] by decreasing logprob
    top_logprobs: torch.Tensor | None = None  # [B, N]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The fields this output has, in order (what goes to the host)."""
        return [t for t in (self.token_ids, self.logprobs, self.ranks, self.top_token_ids, self.top_logprobs)
                if t is not None]

    def rows(self, values: list[list], num_logprobs: Sequence[int | None]) -> SampledRows:
        """``values`` (``tensors`` as host lists) per row: token ids, logprobs and ranks (None where not made) and
        top ``(token id, logprob)`` pairs, each row's cut to its own ``num_logprobs`` (None: none)."""
        num_rows = len(num_logprobs)
        if self.logprobs is None:
            return SampledRows(values[0], [None] * num_rows, [None] * num_rows, [()] * num_rows)
        tops: list[tuple] = [()] * num_rows
        if self.top_token_ids is not None:
            ids, lps = values[3], values[4]
            tops = [tuple(zip(ids[i], lps[i]))[: n or 0] for i, n in enumerate(num_logprobs)]
        return SampledRows(values[0], values[1], values[2], tops)


class SampledRows(NamedTuple):
    """A sampled batch on the host, per row: the token, its raw logprob and rank (None where no row asked for
    logprobs), and the most likely ``(token id, logprob)`` pairs the row asked for."""
    token_ids: list[int]
    logprobs: list[float | None]
    ranks: list[int | None]
    tops: list[tuple]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A request's own generator (None without a seed: it then draws from the engine's)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 64))
    return generator


def _upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or tensor on ``device``, not waiting for a step launched ahead (``tensor_io.upload``)."""
    return upload(torch.as_tensor(values, dtype=dtype), device)


def _padded(rows: Sequence[Sequence[int] | torch.Tensor], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    table = torch.full((len(rows), max(width, 1)), pad, dtype=torch.int64)
    for index, row in enumerate(rows):
        if len(row):
            table[index, : len(row)] = row if isinstance(row, torch.Tensor) else torch.as_tensor(list(row))
    return _upload(table, torch.int64, device)


def _token_counts(rows: Sequence[Sequence[int] | torch.Tensor], vocab_size: int,
                  device: torch.device) -> torch.Tensor:
    """[B, V] how often each token occurs in each row's list."""
    table = _padded(rows, vocab_size, device)
    counts = torch.zeros((len(rows), vocab_size + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, table, torch.ones_like(table, dtype=torch.float32))
    return counts[:, :vocab_size]


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    device, vocab_size = logits.device, logits.shape[1]

    def column(values: list[float]) -> torch.Tensor:
        return _upload(values, torch.float32, device).unsqueeze(1)

    output_counts = _token_counts([r.output_token_ids for r in rows], vocab_size, device)
    repetition = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in repetition):
        seen = (output_counts > 0) | (_token_counts([r.prompt_tensor for r in rows], vocab_size, device) > 0)
        penalty = column(repetition).expand_as(logits)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, scaled, logits))
    logits -= column([r.params.frequency_penalty for r in rows]) * output_counts
    logits -= column([r.params.presence_penalty for r in rows]) * (output_counts > 0).float()


def _add_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Each row's ``logit_bias`` added to its logits (ids past the vocabulary are left out)."""
    biased = [(index, *row.bias_tensors) for index, row in enumerate(rows) if row.params.logit_bias]
    row_index = torch.cat([torch.full((ids.shape[0],), index, dtype=torch.int64) for index, ids, _ in biased])
    token_index = torch.cat([ids for _, ids, _ in biased])
    bias = torch.cat([values for _, _, values in biased])
    kept = token_index < logits.shape[1]  # the Executor refuses such ids (check_prompt); sample() is public
    device = logits.device
    logits.index_put_((_upload(row_index[kept], torch.int64, device), _upload(token_index[kept], torch.int64, device)),
                      _upload(bias[kept], torch.float32, device), accumulate=True)


def _mask_disallowed(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """-inf for the tokens a row may not sample: outside its ``allowed_token_ids`` (the rows that have them, in one
    scatter over a mask of those rows), and its bad words' banned tokens this step (``banned_token_ids``)."""
    device, vocab_size = logits.device, logits.shape[1]
    allowed = [(index, row.allowed_tensor) for index, row in enumerate(rows) if row.params.allowed_token_ids]
    if allowed:
        ids = torch.cat([ids for _, ids in allowed])
        mask_rows = torch.cat([torch.full((row_ids.shape[0],), i, dtype=torch.int64)
                               for i, (_, row_ids) in enumerate(allowed)])
        kept = ids < vocab_size  # the Executor refuses such ids (check_prompt); sample() is public
        blocked = torch.ones((len(allowed), vocab_size), dtype=torch.bool, device=device)
        blocked[_upload(mask_rows[kept], torch.int64, device), _upload(ids[kept], torch.int64, device)] = False
        row_index = _upload([index for index, _ in allowed], torch.int64, device)
        logits[row_index] = logits[row_index].masked_fill(blocked, float("-inf"))
    banned = [(index, token_id) for index, row in enumerate(rows) if row.params.bad_words_token_ids
              for token_id in row.banned_token_ids() if token_id < vocab_size]
    if banned:
        row_index, token_index = zip(*banned)
        logits[_upload(row_index, torch.int64, device), _upload(token_index, torch.int64, device)] = float("-inf")


def _min_p_mask(scaled: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """True where a token's probability is below its row's ``min_p`` times the best token's (vLLM's min_p), in
    log space: ``p < min_p * p_max`` is ``logit < logit_max + log(min_p)`` (no softmax; min_p 0 masks nothing)."""
    log_min_p = _upload(min_p, torch.float32, scaled.device).log().unsqueeze(1)
    return scaled < scaled.amax(dim=-1, keepdim=True) + log_min_p


def _top_k_top_p_mask(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """True where a token falls outside its row's top-k or top-p set (the best one never does)."""
    device, vocab_size = logits.device, logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=device).unsqueeze(0)
    k = _upload([vocab_size if k <= 0 else min(k, vocab_size) for k in top_k], torch.int64, device).unsqueeze(1)
    removed_sorted = ranks >= k
    sorted_logits = sorted_logits.masked_fill(removed_sorted, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
    p = _upload(top_p, torch.float32, device).unsqueeze(1)
    removed_sorted |= (mass_before > p) & (p < 1.0)  # top_p 1 keeps all: the cumsum's rounding may pass 1
    removed_sorted[:, 0] = False
    return torch.zeros_like(removed_sorted).scatter(1, order, removed_sorted)


def logprob_and_rank(logprobs: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's logprob of its token (``logprobs`` ``[N, vocab]``, ``token_ids`` ``[N]``) and vLLM's rank of it:
    1 + the tokens strictly likelier (ties share the better rank)."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    return chosen, (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1


@torch.no_grad()
def sample(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    *,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """One token per row of ``logits`` [B, V] (rows in the order of ``rows``); rows without a generator of their
    own draw from ``generator`` (the engine's, seeded by its ``seed``; None: torch's default one)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows), vocab], got {tuple(logits.shape)} for {len(rows)} rows")
    if all(r.is_argmax for r in rows):  # the common greedy batch: one kernel, no copy of the logits
        return SamplerOutput(token_ids=logits.argmax(dim=-1))
    device, vocab_size = logits.device, logits.shape[1]
    logits = logits.float().clone()
    num_top = max((r.params.logprobs or 0 for r in rows), default=0)
    wants_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None

    masked = [
        (index, token_id)
        for index, row in enumerate(rows)
        if len(row.output_token_ids) < row.params.min_tokens
        for token_id in {*row.params.stop_token_ids, *eos_token_ids}  # EOS too with ignore_eos, as vLLM
        if 0 <= token_id < vocab_size
    ]
    if masked:
        row_index, token_index = zip(*masked)
        logits[_upload(row_index, torch.int64, device), _upload(token_index, torch.int64, device)] = float("-inf")
    if any(r.params.allowed_token_ids is not None or r.params.bad_words for r in rows):
        _mask_disallowed(logits, rows)
    if any(r.matcher is not None for r in rows):
        apply_bitmasks(logits, [r.matcher for r in rows], eos_token_ids)
    if any(r.params.logit_bias for r in rows):
        _add_logit_bias(logits, rows)
    if any(r.params.repetition_penalty != 1.0 or r.params.frequency_penalty or r.params.presence_penalty for r in rows):
        _apply_penalties(logits, rows)

    is_greedy = [r.params.is_greedy for r in rows]
    token_ids = logits.argmax(dim=-1)
    if not all(is_greedy):
        temperature = _upload([1.0 if g else r.params.temperature for g, r in zip(is_greedy, rows)],
                              torch.float32, device).unsqueeze(1)
        scaled = logits / temperature
        min_p = [0.0 if g else r.params.min_p for g, r in zip(is_greedy, rows)]
        if any(min_p):
            scaled = scaled.masked_fill(_min_p_mask(scaled, min_p), float("-inf"))
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = scaled.masked_fill(_top_k_top_p_mask(scaled, top_k, top_p), float("-inf"))
        probs = scaled.softmax(dim=-1)
        # exponential race: argmax(p / E) with E ~ Exp(1) draws from p
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for index, row in enumerate(rows):
            if row.generator is not None and not is_greedy[index]:
                noise[index].exponential_(generator=row.generator)
        sampled = (probs / noise).argmax(dim=-1)
        token_ids = torch.where(_upload(is_greedy, torch.bool, device), token_ids, sampled)

    if raw_logprobs is None:
        return SamplerOutput(token_ids=token_ids)
    chosen, ranks = logprob_and_rank(raw_logprobs, token_ids)
    if num_top == 0:
        return SamplerOutput(token_ids=token_ids, logprobs=chosen, ranks=ranks)
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, ranks=ranks, top_token_ids=top_ids,
                         top_logprobs=top_values)
