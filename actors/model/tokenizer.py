"""``Tokenizer``: a ``tokenizers`` tokenizer plus what transformers keeps beside it.

BOS handling, EOS ids, special tokens, the chat template (rendered with
jinja2 the way transformers renders it: ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``, ``strftime_now``, its ``tojson``
filter and its ``{% generation %}`` tag) and what the vocabulary spells each
token as (``token_str``, ``token_bytes``).

A ``Tokenizer`` and its backend are never changed after construction, so
``encode``, ``encode_chat`` and ``decode`` may be called from worker threads:
the Rust tokenizer only takes shared borrows for them (changing the backend, say
its truncation, while another thread encodes would fail with "Already
borrowed"), and a jinja2 template renders each call in its own context.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.jsonfile import read_json, write_json
from fastdecode.actors.model.synthetic_tokenizer import byte_alphabet

# Characters of text per token assumed where the vocabulary gives no bound (see ``max_chars_per_token``).
FALLBACK_MAX_CHARS_PER_TOKEN = 64
_BYTE_OF_CHAR = MappingProxyType({char: byte for byte, char in enumerate(byte_alphabet())})  # byte-level BPE's
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def _raise_exception(message: str) -> None:
    raise ModelError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: plain ``json.dumps``, not jinja's HTML-escaping filter."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: TRL marks assistant text with it for training.

    Serving renders the body unchanged, as transformers does when it is not tracking
    assistant tokens."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def compile_chat_template(source: str) -> Any:
    """A chat template's Jinja source compiled as transformers compiles it; ``ModelError`` if it does not parse."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(f"chat template does not parse: {exc.message} (line {exc.lineno})") from None


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        eos_id = None if eos_token is None else backend.token_to_id(eos_token)
        # the model's EOS ids (config, generation config) and the tokenizer's own, on which vLLM stops as well: a
        # chat fine-tune whose config names </s> while its tokenizer's EOS is <|im_end|> would run on past it
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids) + (
            (eos_id,) if eos_id is not None and eos_id not in eos_token_ids else ())
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self._template = None if chat_template is None else compile_chat_template(chat_template)
        added_tokens = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(token_id for token_id, token in added_tokens.items() if token.special)
        self._added_token_ids = frozenset(added_tokens)
        self._token_texts: dict[int, str] = {}  # token_text's, made once per token (the vocabulary bounds it)
        self._is_byte_level_decoder = _has_byte_level_step(_component_json(backend.decoder))
        self.max_chars_per_token = _max_chars_per_token(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: only the batch call lets go of the GIL while the Rust code runs, which a
        # caller on a worker thread needs so that the event loop runs meanwhile (same ids either way)
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """The chat rendered with the template: its text, or with ``tokenize`` its token ids (the template writes
        any BOS). transformers' default is ``tokenize=True``; this one's is the text, which vLLM code asks for."""
        if self._template is None:
            raise ModelError("this model's tokenizer has no chat template")
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- the parts of a transformers tokenizer that vLLM client code reads -------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS id (None without one); ``eos_token_ids`` also has the model config's."""
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.special_token_ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True) -> dict[str, Any]:
        """transformers' call: ``{"input_ids", "attention_mask"}`` of a text, or lists of them for a list of texts."""
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([text] if isinstance(text, str)
                                                                              else text)]
        masks = [[1] * len(one) for one in ids]
        return {"input_ids": ids[0], "attention_mask": masks[0]} if isinstance(text, str) else {
            "input_ids": ids, "attention_mask": masks}

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        return self.backend.id_to_token(ids) if isinstance(ids, int) else [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    add_special_tokens: bool = False, **template_kwargs: Any) -> list[int]:
        """Token ids of the chat rendered with the template (and its extra variables ``template_kwargs``),
        tokenized with special tokens only when ``add_special_tokens`` asks: by default the template writes any
        BOS itself (vLLM's chat default)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=add_special_tokens)

    def with_chat_template(self, chat_template: str) -> "Tokenizer":
        """This tokenizer with another chat template (vLLM's ``--chat-template``); this one keeps its own."""
        return Tokenizer(self.backend, bos_token=self.bos_token, eos_token=self.eos_token,
                         eos_token_ids=self.eos_token_ids, chat_template=chat_template,
                         add_bos_token=self.add_bos_token)

    def token_str(self, token_id: int) -> str | None:
        """The vocabulary's spelling of a token id (``Ġ`` for a byte-level space), None outside the vocabulary."""
        return self.backend.id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs name it (special tokens spelled out), decoded once per token: responses
        name the same tokens over and over (a prompt's, and the likely ones at each position)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token id stands for: a byte-level BPE spells every byte as one character, a
        byte-fallback token ``<0xNN>`` is byte NN, a SentencePiece ``▁`` is a space.  A token that is part of a
        UTF-8 character gets its own bytes, where its decoded text is U+FFFD."""
        piece = self.backend.id_to_token(token_id)
        if piece is None or token_id in self._added_token_ids:  # added tokens match their own text
            return self.token_text(token_id).encode("utf-8")
        if self._is_byte_level_decoder and all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match is not None:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_METASPACE, " ").encode("utf-8")

    # ----- HF directory files ----------------------------------------------
    @classmethod
    def from_dir(cls, folder: Path, *, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        """Read ``tokenizer.json`` and (if present) ``tokenizer_config.json``/``chat_template.jinja``; a
        ``chat_template.jinja`` wins over tokenizer_config.json's ``chat_template``, as in transformers (and vLLM)."""
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"missing tokenizer file {path}")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception on parse errors
            raise ModelError(f"corrupt tokenizer file {path}: {str(exc).splitlines()[0]}") from None
        config = read_json(Path(folder) / "tokenizer_config.json", required=False)
        jinja_file = Path(folder) / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": ..., "template": ...}]
                named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
                template = named.get("default")
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            eos_token_ids=eos_token_ids,
            chat_template=template if isinstance(template, str) else None,
            add_bos_token=config.get("add_bos_token"),
        )

    def save(self, folder: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` that transformers loads; ``OSError`` if it cannot."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            self.backend.save(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception on I/O errors (a full disk...)
            raise OSError(f"cannot write {path}: {exc}") from None
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
        }
        if self.add_bos_token is not None:
            config["add_bos_token"] = self.add_bos_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", config)


def _max_chars_per_token(backend: BackendTokenizer) -> int:
    """The most characters of text one token can stand for: a text longer than ``n`` times this has more
    than ``n`` tokens.

    A byte-level BPE with no normaliser (the GGUF, HF byte-level and synthetic tokenizers) puts every byte
    of the text in exactly one token, its vocabulary spells one byte per character and added tokens match
    their own text, so no token covers more characters than the longest vocabulary entry (81 for SmolLM2).
    A tokenizer that normalises, drops unknown text or whitespace, or whose added tokens strip the spaces
    beside them has no such bound; it gets ``FALLBACK_MAX_CHARS_PER_TOKEN``, a generous guess.
    """
    is_lossless = (backend.normalizer is None and isinstance(backend.model, models.BPE)
                   and _is_byte_level(_component_json(backend.pre_tokenizer))
                   and not any(token.lstrip or token.rstrip for token in backend.get_added_tokens_decoder().values()))
    if not is_lossless:
        return FALLBACK_MAX_CHARS_PER_TOKEN
    return max(len(token) for token in backend.get_vocab(with_added_tokens=True))


def _is_byte_level(pre_tokenizer: dict[str, Any]) -> bool:
    """Whether a pre-tokenizer (as its JSON) keeps every byte: ``ByteLevel``, alone or in a ``Sequence``
    with ``Digits`` (which only splits)."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") for step in steps]
    return "ByteLevel" in kinds and all(kind in ("ByteLevel", "Digits") for kind in kinds)


def _component_json(component: Any) -> dict[str, Any]:
    """A backend component (pre-tokenizer, decoder) as its JSON object; {} when the backend has none."""
    return json.loads(component.__getstate__()) if component is not None else {}


def _has_byte_level_step(decoder: dict[str, Any]) -> bool:
    """Whether a decoder (as its JSON), alone or in a ``Sequence``, maps byte-level characters back to bytes."""
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

