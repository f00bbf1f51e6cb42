"""The project's chat format: the special tokens the tokenizer reserves, the template that uses them,
and the checks a conversation must pass before it is rendered.

One format for everything that turns conversations into tokens: the post-training phase of
pretraining and fine-tuning both read it from the exported tokenizer directory
(``chat_template``), never from here, so a model directory always carries its own format.

ChatML-style turns: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Two dedicated tokens mark
the turn boundaries, so role names and content can never be confused with them, and the
assistant's turn ends with a token the model learns to emit (``<|im_end|>``, also a stop token
for generation).
"""

from __future__ import annotations

from typing import Any

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

ROLES = ("system", "user", "assistant")
# Files a conversation source may hold.
CONVERSATION_SUFFIXES = (".jsonl", ".jsonl.gz")

# Why a line is not encoded; one reason per line, the first problem found.
NOT_JSON = "not_json"
# A truncated or corrupt .gz: counted once for the rest of the file, as documents count it.
CORRUPT_FILE = "corrupt_file"
NO_MESSAGES = "no_messages"
BAD_MESSAGE = "bad_message"
BAD_ROLE = "bad_role"
SYSTEM_NOT_FIRST = "system_not_first"
BAD_CONTENT = "bad_content"
EMPTY_CONTENT = "empty_content"
CHAT_TOKEN_IN_CONTENT = "chat_token_in_content"
NO_USER_TURN = "no_user_turn"
NO_ASSISTANT_TURN = "no_assistant_turn"


def rejection(record: Any) -> tuple[str, str] | None:
    """Why ``record`` cannot be encoded as a conversation, as (reason, detail); None if it can."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return NO_MESSAGES, "expected an object whose 'messages' is a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return BAD_MESSAGE, f"message {index} is not an object"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            return (
                BAD_ROLE,
                f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}",
            )
        if role == "system" and index > 0:
            return SYSTEM_NOT_FIRST, f"message {index} is a system message; only the first may be"
        if not isinstance(content, str):
            return BAD_CONTENT, f"message {index} has content of type {type(content).__name__}"
        if not content.strip():
            return EMPTY_CONTENT, f"message {index} has empty content"
        # A literal turn token would encode to the real token id and forge a turn boundary.
        forged = sorted((content.find(token), token) for token in CHAT_TOKENS if token in content)
        if forged:
            return CHAT_TOKEN_IN_CONTENT, f"message {index} contains {forged[0][1]}"
    roles = {message["role"] for message in messages}
    if "user" not in roles:
        return NO_USER_TURN, "no user message"
    if "assistant" not in roles:
        return NO_ASSISTANT_TURN, "no assistant message"
    return None
