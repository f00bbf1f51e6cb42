"""The project's chat format: the special tokens the tokenizer reserves and the template that uses them.

One format for everything that turns conversations into tokens: the post-training phase of
pretraining and fine-tuning both read it from the exported tokenizer directory
(``chat_template``), never from here, so a model directory always carries its own format.

ChatML-style turns: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Two dedicated tokens mark
the turn boundaries, so role names and content can never be confused with them, and the
assistant's turn ends with a token the model learns to emit (``<|im_end|>``, also a stop token
for generation).
"""

from __future__ import annotations

TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
CHAT_TOKENS = (TURN_START, TURN_END)

# Jinja, as transformers' apply_chat_template renders it. The BOS token is added by the
# tokenizer when it encodes the rendered text, so the template does not write it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '"
    + TURN_START
    + "' + message['role'] + '\\n' + message['content'] + '"
    + TURN_END
    + "' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + TURN_START + "assistant\\n' }}{% endif %}"
)
