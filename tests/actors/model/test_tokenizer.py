"""``Tokenizer``: chat encoding with template variables and special tokens, the chat template it reads or is given,
and each token's spelling and bytes."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models

from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.synthetic_tokenizer import BOS_TOKEN, BOS_TOKEN_ID, CHAT_TEMPLATE
from fastdecode.actors.model.tokenizer import Tokenizer
from synthetic_tokenizers import synthetic_tokenizer

THINKING_TEMPLATE = "{% if enable_thinking %}<think>{% endif %}" + CHAT_TEMPLATE
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return synthetic_tokenizer(chat_template=THINKING_TEMPLATE, add_bos_token=True)


def test_encode_chat_takes_template_variables_and_special_tokens(tokenizer):
    plain = tokenizer.encode_chat(MESSAGES)
    assert plain == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    thinking = tokenizer.encode_chat(MESSAGES, enable_thinking=True)
    assert thinking == tokenizer.encode("<think>" + tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert thinking != plain
    bare = tokenizer.encode_chat(MESSAGES, add_generation_prompt=False)
    assert plain[:len(bare)] == bare and len(plain) > len(bare)
    # the template writes the BOS after <think>: add_special_tokens puts another one first (add_bos_token)
    special = tokenizer.encode_chat(MESSAGES, add_special_tokens=True, enable_thinking=True)
    assert special == [BOS_TOKEN_ID, *thinking]


def test_token_str_is_the_vocabulary_spelling(tokenizer):
    ids = tokenizer.encode(" France", add_special_tokens=False)
    assert "".join(tokenizer.token_str(t) for t in ids) == "ĠFrance"
    assert tokenizer.token_str(BOS_TOKEN_ID) == BOS_TOKEN
    assert tokenizer.token_str(tokenizer.vocab_size + 5) is None


def test_token_bytes_of_byte_fallback_and_metaspace_tokens():
    """A SentencePiece-style vocabulary: ``<0xNN>`` is one byte, ``▁`` a space."""
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "▁hi": 3, "h": 4, "i": 5, "▁": 6}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = Tokenizer(backend)
    assert [tokenizer.token_bytes(t) for t in (1, 2, 3)] == [b"\xc3", b"\xa9", b" hi"]
    assert tokenizer.decode([1, 2]) == "é"


def test_the_tokenizers_eos_stops_beside_the_models(tokenizer):
    """vLLM stops on the tokenizer's EOS as well as the config's EOS ids: a chat fine-tune whose config names </s>
    while its tokenizer's EOS is <|im_end|> ran on past it."""
    backend, eos_id = tokenizer.backend, tokenizer.backend.token_to_id(tokenizer.eos_token)
    other = next(i for i in range(backend.get_vocab_size()) if i != eos_id)
    assert Tokenizer(backend, eos_token=tokenizer.eos_token, eos_token_ids=(other,)).eos_token_ids == (other, eos_id)
    assert Tokenizer(backend, eos_token=tokenizer.eos_token, eos_token_ids=(eos_id,)).eos_token_ids == (eos_id,)
    assert Tokenizer(backend, eos_token=tokenizer.eos_token).eos_token_ids == (eos_id,)
    assert Tokenizer(backend, eos_token_ids=(other,)).eos_token_ids == (other,)


BRACKETS_TEMPLATE = "{{ bos_token }}{% for message in messages %}[{{ message.content }}]{% endfor %}"


def test_a_chat_template_jinja_file_wins_over_tokenizer_configs(tokenizer, tmp_path):
    """transformers (and so vLLM) reads chat_template.jinja over tokenizer_config.json's chat_template."""
    tokenizer.save(tmp_path)  # tokenizer_config.json holds THINKING_TEMPLATE
    assert Tokenizer.from_dir(tmp_path).chat_template == THINKING_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text(BRACKETS_TEMPLATE, encoding="utf-8")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.chat_template == BRACKETS_TEMPLATE
    assert loaded.apply_chat_template(MESSAGES) == BOS_TOKEN + "[hi]"


def test_with_chat_template_changes_only_the_template(tokenizer):
    """vLLM's --chat-template: another template over the same vocabulary, BOS/EOS handling and special tokens; the
    tokenizer it came from keeps its own."""
    other = tokenizer.with_chat_template(BRACKETS_TEMPLATE)
    assert other.apply_chat_template(MESSAGES) == BOS_TOKEN + "[hi]"
    assert other.chat_template == BRACKETS_TEMPLATE and tokenizer.chat_template == THINKING_TEMPLATE
    assert other.encode("hi there") == tokenizer.encode("hi there")
    assert (other.eos_token_ids, other.bos_token_id, other.special_token_ids) == (
        tokenizer.eos_token_ids, tokenizer.bos_token_id, tokenizer.special_token_ids)
    with pytest.raises(ModelError, match="chat template does not parse"):
        tokenizer.with_chat_template("{% for message in messages %}")


def test_save_into_a_folder_it_cannot_write_raises_os_error(tokenizer, tmp_path):
    """The Rust library raises a bare Exception; a full disk or a missing folder is an OSError naming the file."""
    with pytest.raises(OSError, match="tokenizer.json"):
        tokenizer.save(tmp_path / "missing")


def test_the_transformers_surface_vllm_client_code_reads(tokenizer):
    """vLLM code gets a transformers tokenizer from ``get_tokenizer()`` and reads eos_token_id, len(), calls it,
    converts ids and tokens, and renders chats with ``tokenize`` True or False."""
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    assert tokenizer("Hello there", add_special_tokens=False) == {"input_ids": ids, "attention_mask": [1] * len(ids)}
    assert tokenizer(["Hello", "there"])["input_ids"] == [tokenizer.encode("Hello"), tokenizer.encode("there")]
    assert len(tokenizer) == tokenizer.vocab_size == len(tokenizer.get_vocab())
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.convert_tokens_to_ids(tokens) == ids and tokenizer.convert_ids_to_tokens(ids[0]) == tokens[0]
    assert tokenizer.eos_token_id == tokenizer.backend.token_to_id(tokenizer.eos_token)
    assert BOS_TOKEN_ID in tokenizer.all_special_ids and tokenizer.eos_token_id in tokenizer.all_special_ids
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages) == text and isinstance(text, str)
    assert tokenizer.apply_chat_template(messages, tokenize=True) == tokenizer.encode_chat(messages)
