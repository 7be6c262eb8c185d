"""What the embedding API's calls take, checked before anything starts or is submitted: the cluster's
configuration as vLLM's ``LLM(...)`` keywords, prompts, chat conversations and SamplingParams."""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.executor_config import ExecutorConfig
from fastdecode.actors.request import SamplingParams
from fastdecode.scheduler import SchedulerConfig

PromptInput = str | Sequence[int] | Mapping[str, object]  # text, token ids, or vLLM's TextPrompt/TokensPrompt
PROMPT_KEYS = ("prompt", "prompt_token_ids")
# keywords of LLM(...) that go into the nested configs (vLLM's max_model_len, max_num_seqs, max_num_batched_tokens...)
EXECUTOR_KEYS = frozenset(f.name for f in dataclasses.fields(ExecutorConfig)) - {"scheduler"}
SCHEDULER_KEYS = frozenset(f.name for f in dataclasses.fields(SchedulerConfig))
CLUSTER_KEYS = frozenset(f.name for f in dataclasses.fields(ClusterConfig))


@dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt as token ids, and its text where it was given as text."""

    token_ids: list[int]
    text: str | None = None


def cluster_config(model: str | ClusterConfig | None = None, config: ClusterConfig | None = None,
                   **fields) -> ClusterConfig:
    """What ``LLM(...)``/``AsyncLLM.start(...)`` start: a ClusterConfig, or a model name (vLLM's
    ``LLM(model=...)``), and as keywords ClusterConfig's fields and those of its ExecutorConfig and
    SchedulerConfig (``max_model_len=2048, max_num_seqs=64``), which override the config's."""
    if isinstance(model, ClusterConfig):
        if config is not None:
            raise TypeError("give the ClusterConfig once (as the first argument or as config=)")
        model, config = None, model
    if model is not None:
        if not isinstance(model, str):
            raise TypeError(f"model must be a model name or a ClusterConfig, got {type(model).__name__}")
        fields["model"] = model
    if config is not None and not isinstance(config, ClusterConfig):
        raise TypeError(f"config must be a ClusterConfig, got {type(config).__name__}")
    if fields.pop("enable_prefix_caching", None) is False:  # vLLM's switch (None: the default, on)
        fields["prefix_cache_bytes"] = 0
    unknown = sorted(set(fields) - CLUSTER_KEYS - EXECUTOR_KEYS - SCHEDULER_KEYS)
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(unknown)}: the keywords are ClusterConfig's fields "
                        f"({', '.join(sorted(CLUSTER_KEYS))}), ExecutorConfig's ({', '.join(sorted(EXECUTOR_KEYS))}) "
                        f"and SchedulerConfig's ({', '.join(sorted(SCHEDULER_KEYS))})")
    executor_fields = {name: fields.pop(name) for name in list(fields) if name in EXECUTOR_KEYS}
    scheduler_fields = {name: fields.pop(name) for name in list(fields) if name in SCHEDULER_KEYS}
    if executor_fields or scheduler_fields:
        executor = fields.get("executor", config.executor if config is not None else ExecutorConfig())
        if not isinstance(executor, ExecutorConfig):
            raise TypeError(f"executor must be an ExecutorConfig, got {type(executor).__name__}")
        if scheduler_fields:
            executor_fields["scheduler"] = dataclasses.replace(executor.scheduler, **scheduler_fields)
        fields["executor"] = dataclasses.replace(executor, **executor_fields)
    return dataclasses.replace(config, **fields) if config is not None else ClusterConfig(**fields)


def check_params(params: SamplingParams | None, name: str = "params",
                 default: SamplingParams | None = None) -> SamplingParams:
    """``params`` itself; None is ``default`` (the model's, see AsyncLLM.get_default_sampling_params), else
    SamplingParams()."""
    if params is None:
        return default if default is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"{name} must be a SamplingParams (or None), got {type(params).__name__}")
    return params


def params_per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int,
                      name: str = "params", default: SamplingParams | None = None) -> list[SamplingParams]:
    """One SamplingParams for every prompt, or one per prompt (vLLM's ``Sequence[SamplingParams]``); None is
    ``default``."""
    if params is None or isinstance(params, SamplingParams):
        return [check_params(params, name, default)] * num_prompts
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Sequence):
        raise TypeError(f"{name} must be a SamplingParams or a list of them, got {type(params).__name__}")
    if len(params) != num_prompts:
        raise ValueError(f"{name} has {len(params)} SamplingParams for {num_prompts} prompt(s): give one, "
                         "or one per prompt")
    return [check_params(p, name, default) for p in params]


def as_batch(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    """The prompts of a ``generate`` call: a str, a dict or a flat list of ints is one prompt."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a prompt (a str, token ids, or a dict with 'prompt' or "
                        f"'prompt_token_ids') or a list of them, got {type(prompts).__name__}")
    items = list(prompts)
    if items and is_token_id(items[0]):
        return [items]
    return items


def as_conversations(messages: Sequence[Mapping[str, object]] | Sequence[Sequence[Mapping[str, object]]],
                     ) -> list[list[object]]:
    """The conversations of vLLM's ``LLM.chat``: one conversation (a list of message dicts) or a list of them.
    Each message is checked later, by the server's own message parser."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError("messages must be a non-empty list of message dicts ({'role': ..., 'content': ...}) or "
                        f"a list of such lists, got {type(messages).__name__ if messages else 'an empty list'}")
    is_batch = not isinstance(messages[0], (str, bytes, Mapping)) and isinstance(messages[0], Sequence)
    conversations = list(messages) if is_batch else [messages]
    return [[dict(m) if isinstance(m, Mapping) else m for m in conversation] for conversation in conversations]


def is_token_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def token_ids(value: object, name: str) -> list[int]:
    """``value`` as a list of token ids; TypeError naming ``name`` for anything else."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(value).__name__}")
    bad = next((t for t in value if not is_token_id(t)), None)
    if bad is not None:
        raise TypeError(f"{name} must be integers, got {bad!r}")
    return [operator.index(t) for t in value]
