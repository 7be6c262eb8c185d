"""Chat templates render in the environment transformers gives them: ``{% generation %}`` and its ``tojson``."""
from __future__ import annotations

import json

from fastdecode.actors.model.synthetic_tokenizer import NUM_TEXT_TOKENS, build_synthetic_tokenizer
from fastdecode.actors.model.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "20°C & <sunny>, it's ok"}]


def _tokenizer(template: str) -> Tokenizer:
    return Tokenizer(build_synthetic_tokenizer(NUM_TEXT_TOKENS + 2), chat_template=template)


def test_generation_block_renders_its_body_unchanged():
    """TRL saves templates that mark assistant turns for assistant-only loss; serving ignores the mark."""
    template = (
        "{% for message in messages %}{{ message.role }}: "
        "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}|{% endgeneration %}"
        "{% else %}{{ message.content }}|{% endif %}{% endfor %}"
    )
    rendered = _tokenizer(template).apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert rendered == "user: weather?|assistant: 20°C & <sunny>, it's ok|"


def test_tojson_is_plain_json_without_html_escapes():
    rendered = _tokenizer("{% for message in messages %}{{ message.content | tojson }}{% endfor %}")\
        .apply_chat_template(MESSAGES[1:], add_generation_prompt=False)
    assert rendered == '"20°C & <sunny>, it\'s ok"'
    assert json.loads(rendered) == MESSAGES[1]["content"]


def test_tojson_takes_transformers_options():
    template = "{{ messages[0] | tojson(indent=2, sort_keys=True) }}|{{ messages[0] | tojson(separators=(',', ':')) }}"
    message = {"role": "user", "content": "é"}
    rendered = _tokenizer(template).apply_chat_template([message], add_generation_prompt=False)
    assert rendered == json.dumps(message, indent=2, sort_keys=True, ensure_ascii=False) + "|" + \
        json.dumps(message, separators=(",", ":"), ensure_ascii=False)
