"""Turns a request's prompts (texts, token ids, chat messages) into token ids, checking them first.

Every text must be valid Unicode that UTF-8 can encode (no lone surrogates); token ids must be
in the vocabulary; chat roles are the OpenAI ones (``developer`` is rendered as ``system``).
Special tokens written inside message content stay text: ``<|im_start|>system`` in a user message
is tokenized as the characters it is, never as the template's control token, so a user cannot
forge a turn. Large inputs are tokenized in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .errors import InvalidRequest

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Inputs with more characters than this are tokenized off the event loop.
OFF_LOOP_CHARS = 2048


def check_text(value: str, param: str) -> str:
    """Refuse text that cannot be encoded as UTF-8 (lone UTF-16 surrogates from JSON escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param} is not valid Unicode text (a lone surrogate?)", param=param) from None
    return value


class PromptBuilder:
    """Tokenizer-side work of the request path; one per server."""

    def __init__(self, tokenizer, max_chat_messages: int) -> None:
        self.tokenizer = tokenizer
        self.max_chat_messages = max_chat_messages
        vocab = tokenizer.get_vocab()
        self.max_token_id = max(vocab.values())
        # Strings the tokenizer turns into control tokens when they appear in text.
        self._special = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}, key=len, reverse=True)
        # One thread: tokenizing is CPU-bound, and a second one would only compete with the engine.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    # -- checks ----------------------------------------------------------------------------------
    def check_token_ids(self, ids: Sequence[int], param: str = "prompt") -> list[int]:
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= self.max_token_id:
                raise InvalidRequest(f"{param}: token id {repr(token)[:24]} is out of the vocabulary "
                                     f"[0, {self.max_token_id}]", param=param)
        return list(ids)

    def check_messages(self, messages: Sequence[dict]) -> list[dict]:
        """Roles checked and mapped, content text checked: what the template gets."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if len(messages) > self.max_chat_messages:
            raise InvalidRequest(f"messages has {len(messages)} entries; at most {self.max_chat_messages} are allowed",
                                 param="messages")
        checked = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                                     param=f"messages.{i}.role")
            content = check_text(message.get("content") or "", f"messages.{i}.content")
            checked.append({"role": CHAT_ROLES[role], "content": content})
        return checked

    # -- tokenizing ------------------------------------------------------------------------------
    async def run(self, function, *args, size: int):
        """``function(*args)`` on the event loop when small, else in the tokenizer thread."""
        if size <= OFF_LOOP_CHARS:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template applied with add_generation_prompt; content special tokens stay text."""
        if not any(token in m["content"] for m in messages for token in self._special):
            text = self._apply_template(messages)
            return self.tokenizer.encode(text, add_special_tokens=False)
        # Render with a unique marker per content, then tokenize the template's own text (its
        # control tokens recognised) and each content (special tokens split into plain text) apart.
        nonce = secrets.token_hex(8)
        markers = [f"@@content-{nonce}-{i}@@" for i in range(len(messages))]
        text = self._apply_template([{"role": m["role"], "content": mark} for m, mark in zip(messages, markers)])
        ids: list[int] = []
        pattern = re.compile("(" + "|".join(re.escape(mark) for mark in markers) + ")")
        for piece in pattern.split(text):
            if not piece:
                continue
            if piece in markers:
                content = messages[markers.index(piece)]["content"]
                ids.extend(self.tokenizer(content, add_special_tokens=False, split_special_tokens=True).input_ids)
            else:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def _apply_template(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template error is the caller's malformed conversation
            raise InvalidRequest(f"messages could not be rendered with the chat template: {exc}",
                                 param="messages") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
