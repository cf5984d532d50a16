"""Conversations into prompt tokens with the tokenizer's own chat template (OpenAI chat completions)."""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from peftserve.errors import InvalidRequest, quote

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'A: ' + message['content'] + '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)
"""The embedded default model's template: system text as is, then 'Q: ...' / 'A: ...' lines, and 'A:'
to answer: the prompt shape its demo adapters are trained on."""


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of messages in the chat template with the assistant's turn opened.

    Control tokens inside message text (say a literal '</s>') are encoded as plain text, so a caller
    cannot forge the template's turn markers.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            "this model has no chat template (tokenizer_config.json has no chat_template):"
            " use /v1/completions with a prompt instead"
        )
    try:
        encoded = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            sanitize_control_tokens=True,
            return_dict=True,
        )
    except TemplateError as e:  # raise_exception() in the template: roles out of order, a role it lacks ...
        raise InvalidRequest(
            f"the model's chat template refused the messages: {quote(str(e), 200)}"
        ) from None
    return list(encoded["input_ids"])
