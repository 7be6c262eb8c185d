"""The Executor's configuration and the errors ``Executor.submit`` raises to refuse a request."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastdecode.actors.prefix_cache import CUDA_MIN_HIT_TOKENS, DEFAULT_CACHE_BYTES, PrefixCache
from fastdecode.actors.request import RequestError, SamplingParams
from fastdecode.scheduler import SchedulerConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fastdecode.executor")

DEFAULT_BATCHED_TOKENS_GPU = 2048  # vLLM's chunked-prefill default order
DEFAULT_BATCHED_TOKENS_CPU = 256


@dataclass(frozen=True)
class ExecutorConfig:
    max_model_len: int | None = None  # None: the model's context length
    max_queue: int = 4096
    is_pipelined: bool = True
    # a gpu-only step that ran as one graph replay launches the next step with its sampled tokens on
    # the device, before the host has read them (hides the host's time between steps)
    is_launching_ahead: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # compiled dense segments or CUDA graphs: compile and capture them before serving (actors/warm_up.py)
    is_warmed_up: bool = True
    # batch sizes of the start-up dense-step sweep (the scheduler's GPU model); () skips it
    profile_batches: tuple[int, ...] = ()
    # chunked prefill, as vLLM: the most tokens one step carries, each sequence decoding in it counting one and
    # the admitted prompts the rest (one that does not fit is prefilled in chunks over several steps, so the
    # running sequences keep their pace); None: by the device (batched_tokens_for); 0: each admitted prompt is
    # prefilled whole at once
    max_num_batched_tokens: int | None = None
    # the most top logprobs a request may ask per token (logprobs, prompt_logprobs), as vLLM's --max-logprobs;
    # -1: the whole vocabulary
    max_logprobs: int = 20
    # automatic prefix caching (actors/prefix_cache.py): device memory for the K/V of prompts' leading blocks, which
    # later prompts that begin alike skip computing (vLLM's --enable-prefix-caching); 0: none
    prefix_cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer of at least -1 (-1: the whole vocabulary), got "
                             f"{self.max_logprobs!r}")
        if isinstance(self.prefix_cache_bytes, bool) or not isinstance(self.prefix_cache_bytes, int) \
                or self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be a non-negative integer, got {self.prefix_cache_bytes!r}")
        tokens = self.max_num_batched_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ValueError(f"max_num_batched_tokens must be a non-negative integer or None, got {tokens!r}")
        if any(b < 1 for b in self.profile_batches) or len(set(self.profile_batches)) == 1:
            raise ValueError("profile_batches must be two or more distinct positive batch sizes")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer (every request waits in the queue before it "
                             f"runs), got {self.max_queue!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if tokens and tokens < self.max_num_seqs:
            log.warning("max_num_batched_tokens %d is below max_num_seqs %d: each decoding sequence takes a token of "
                        "it, so a large batch leaves prefill little and may never fill (vLLM refuses this)",
                        tokens, self.max_num_seqs)

    def batched_tokens_for(self, device: "torch.device") -> int | None:
        """The step's token limit on ``device`` (None: no limit). By default vLLM's 2048 on a GPU, or twice
        max_num_seqs where that is more (each decoding sequence takes one token of it: a full batch leaves prefill
        half, where 2048 would leave it the 64-token floor and the batch would never fill); 256 on a CPU, whose
        prefill runs about a hundred times slower: a 2048-token chunk of even SmolLM2-135M holds the running
        streams for seconds there."""
        if self.max_num_batched_tokens is None:
            if device.type == "cpu":
                return DEFAULT_BATCHED_TOKENS_CPU
            return max(DEFAULT_BATCHED_TOKENS_GPU, 2 * self.max_num_seqs)
        return self.max_num_batched_tokens or None

    def prefix_cache(self, device: "torch.device") -> PrefixCache | None:
        """A new prefix cache for an Executor on ``device``, or None where prefix_cache_bytes is 0."""
        if not self.prefix_cache_bytes:
            return None
        return PrefixCache(self.prefix_cache_bytes, min_hit_tokens=CUDA_MIN_HIT_TOKENS if device.type == "cuda" else 0)

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    def max_len_for(self, context: int, node_tokens: int | None = None) -> int:
        """The longest sequence admitted for a model of ``context`` positions, on KV nodes the largest of
        which holds ``node_tokens`` tokens of one sequence (None: not known yet). A sequence must fit one
        node whole: a longer ``max_model_len`` given is an error; the model's own context is cut (logged).
        A ``max_model_len`` past the model's context is an error too, as in vLLM (RoPE and the weights were
        made for that many positions)."""
        if self.max_model_len is not None and self.max_model_len > context:
            raise ValueError(f"max_model_len {self.max_model_len} is longer than the model's context of {context} "
                             "positions (max_position_embeddings); give at most that")
        length = self.max_model_len or context
        if node_tokens is None or node_tokens >= length:
            return length
        if self.max_model_len is not None or node_tokens < 2:
            raise ValueError(f"max_model_len {length} does not fit the KV-cache: the largest KV node holds "
                             f"{node_tokens} tokens of one sequence; give a smaller max_model_len or more KV memory")
        log.warning("the model's context of %d tokens does not fit the largest KV node (%d tokens): "
                    "serving with max_model_len %d", length, node_tokens, node_tokens)
        return node_tokens


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """RequestError unless the token ids ``params`` name (``logit_bias``, ``allowed_token_ids``) are of the
    vocabulary, and its ``bad_words`` were tokenized (``SamplingParams.with_bad_words_token_ids``), as vLLM refuses
    them at submission (a 400 over HTTP)."""
    end_id = params.reasoning_end_token_id
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias[-1:]]),  # both sorted by id
                      ("allowed_token_ids", (params.allowed_token_ids or ())[-1:]),
                      ("reasoning_end_token_id", [] if end_id is None else [end_id])):
        if ids and ids[-1] >= vocab_size:
            raise RequestError(f"{name} token id {ids[-1]} is outside the vocabulary (size {vocab_size})", name)
    if params.bad_words and not params.bad_words_token_ids:
        raise RequestError("bad_words must be tokenized before submission (SamplingParams.with_bad_words_token_ids;"
                           " AsyncLLM and the server do it)", "bad_words")


def check_samplable(params: SamplingParams, eos_token_ids: Iterable[int]) -> None:
    """RequestError (``allowed_token_ids``) where the allowed tokens leave none to sample: each one a one-token bad
    word, or, while ``min_tokens`` holds the stop back, a stop token id or EOS (masked then even with ignore_eos)."""
    if params.allowed_token_ids is None:
        return
    left = set(params.allowed_token_ids) - {word[0] for word in params.bad_words_token_ids if len(word) == 1}
    if params.min_tokens:
        left -= {*params.stop_token_ids, *eos_token_ids}
    if not left:
        held = " or, before min_tokens, stop and EOS tokens" if params.min_tokens else ""
        raise RequestError(f"allowed_token_ids leaves no token to sample: every one is a banned bad word{held}",
                           "allowed_token_ids")


def check_prompt(prompt_ids: list[int], vocab_size: int, max_model_len: int,
                 params: SamplingParams | None = None, eos_token_ids: Iterable[int] = (),
                 max_logprobs: int = -1) -> SamplingParams | None:
    """``params`` as the engine runs them (a logprobs count of -1 as the vocabulary's size); RequestError unless the
    prompt is token ids of the vocabulary that leave room for one more, and the token ids of ``params`` (when given)
    are of the vocabulary (``check_token_ids``), leave a token to sample (``check_samplable``, ``eos_token_ids`` the
    model's) and ask at most ``max_logprobs`` top logprobs (-1: any)."""
    if params is not None:
        params = params.with_vocab_logprobs(vocab_size)
        check_token_ids(params, vocab_size)
        check_samplable(params, eos_token_ids)
        check_logprobs(params, max_logprobs, vocab_size)
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(prompt_ids) >= max_model_len:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_model_len} "
                           "and at least one token must be generated")
    return params


def check_logprobs(params: SamplingParams, max_logprobs: int, vocab_size: int) -> None:
    """RequestError (vLLM's words) for more top logprobs per token than ``max_logprobs`` allows (-1: the whole
    vocabulary, which also caps a larger limit); ``params``' counts of -1 already made the vocabulary's size
    (``SamplingParams.with_vocab_logprobs``)."""
    limit = vocab_size if max_logprobs == -1 else min(max_logprobs, vocab_size)
    for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        count = getattr(params, name)
        if count is not None and count > limit:
            raise RequestError(f"Requested {kind} logprobs of {count}, which is greater than max allowed: {limit}",
                               name)


class QueueFullError(RequestError):
    """More requests waiting than ``max_queue`` allows."""


class UnavailableError(RequestError):
    """The Executor takes no request now: it is draining, or no KV node is alive (retry later). ``code``: the
    OpenAI error code the frontend answers with."""

    code = "unavailable"


class KVNodesDrainingError(UnavailableError):
    """No KV node takes new sequences: the ones left drain (their shard daemons are stopping)."""

    code = "draining"
