"""Prompt token ids for the tasks: plain text, or one user turn in the model's chat template."""

from __future__ import annotations


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_ids(tokenizer, user_text: str, use_chat: bool | None = None) -> list[int]:
    """The prompt ids of one user turn: the chat template with a generation prompt when the tokenizer has one."""
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return encode(tokenizer, text)
    return encode(tokenizer, user_text)
