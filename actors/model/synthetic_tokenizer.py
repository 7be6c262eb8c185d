"""A small real byte-level BPE tokenizer for ``random:<preset>`` models.

The 256 bytes, a few dozen English merges, ``<|bos|>``/``<|eos|>``, then plain
filler tokens ``<|fill_N|>`` up to the model's vocabulary size (no merge ever
produces them; they decode to their own spelling).  Built with ``tokenizers``
so it behaves exactly as a HF ``tokenizer.json`` does, and can be saved as one.
"""
from __future__ import annotations

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

# In merge order; "Ġ" is the byte-level spelling of a space.
_MERGES = """\
Ġ t|h e|i n|e r|a n|Ġ a|o n|r e|Ġt he|Ġ s|e n|a t|o r|Ġ w|e s|Ġ o|i s|i t|Ġ c|e d|a r|Ġ b|in g|Ġ f|o u|a l
Ġ p|Ġ m|Ġ i|l e|Ġ d|Ġa n|Ġt o|Ġo f|Ġan d|Ġi n|Ġi s|Ġ h|Ġ T|Ġ l|Ġ n|Ġ e|Ġ r|Ġ g|Ġ y|o m|l l|Ġ A|Ġ S|Ġ I
Ġ C|Ġ P|Ġ F|a p|Ġc ap|it al|Ġcap ital|Ġf r|c e|an ce|ĠF r|ĠFr ance"""
MERGES: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split(" ")) for line in _MERGES.splitlines() for pair in line.split("|")  # type: ignore[misc]
)
NUM_TEXT_TOKENS = 256 + len(MERGES)
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
BOS_TOKEN_ID = NUM_TEXT_TOKENS
EOS_TOKEN_ID = NUM_TEXT_TOKENS + 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def byte_alphabet() -> list[str]:
    """The printable character GPT-2 byte-level BPE uses for each byte value 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_synthetic_tokenizer(vocab_size: int) -> BackendTokenizer:
    """The byte-level BPE above, padded with filler tokens to ``vocab_size`` ids."""
    if vocab_size < NUM_TEXT_TOKENS + 2:
        raise ValueError(f"the synthetic tokenizer needs a vocabulary of at least {NUM_TEXT_TOKENS + 2}")
    vocab = {char: index for index, char in enumerate(byte_alphabet())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    vocab[BOS_TOKEN] = BOS_TOKEN_ID
    vocab[EOS_TOKEN] = EOS_TOKEN_ID
    for index in range(EOS_TOKEN_ID + 1, vocab_size):
        vocab[f"<|fill_{index}|>"] = index
    assert len(vocab) == vocab_size, "merge results must be new tokens"
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BOS_TOKEN, special=True, normalized=False),
                                AddedToken(EOS_TOKEN, special=True, normalized=False)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)]
    )
    return backend
