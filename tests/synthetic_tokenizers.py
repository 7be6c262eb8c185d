"""The synthetic tokenizer of ``random:<preset>`` models as the ``Tokenizer`` the engine uses, for tests."""
from __future__ import annotations

from fastdecode.actors.model.synthetic_tokenizer import BOS_TOKEN, EOS_TOKEN, NUM_TEXT_TOKENS, build_synthetic_tokenizer
from fastdecode.actors.model.tokenizer import Tokenizer


def synthetic_tokenizer(**options) -> Tokenizer:
    """Its text tokens plus BOS and EOS, named as such; ``options`` go to ``Tokenizer`` (chat_template,
    add_bos_token, eos_token_ids, ...)."""
    return Tokenizer(build_synthetic_tokenizer(NUM_TEXT_TOKENS + 2), **{"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                                                                        **options})
