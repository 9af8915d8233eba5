"""What one request may cost the server: body bytes, and characters tokenized.

uvicorn reads a request body of any size, and tokenizing megabytes of text on the event loop
holds every other client for seconds: one request could knock the server over. Here the body
is counted as it arrives (413 once it passes the limit, without keeping it), and a prompt is
refused as too long before tokenizing when it has more characters than the context could
hold (``max_token_chars``); tokenizing then runs on a thread of its own, off the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from starlette.types import Message, Receive

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DRAIN_S = 10.0  # how long a refused body is read (and dropped) so the client gets the 413, not a reset


class PromptTooLong(ValueError):
    """More characters than the context's tokens can hold."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server's limit of {limit:,} bytes "
                         f"(tpserve serve --max-request-bytes); send a smaller request")


def declared_too_large(headers: list[tuple[bytes, bytes]], limit: int) -> bool:
    """The client announced a body over ``limit`` (Content-Length), so it can be refused unread."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return value.strip().isdigit() and int(value) > limit
    return False


async def drain(receive: Receive) -> None:
    """Read and drop the rest of a refused body: a client still sending it would otherwise see
    its connection reset instead of the answer. uvicorn hands the body over in small pieces,
    so this holds no more memory than one piece; it gives up after ``DRAIN_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_S
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout=max(0.01, deadline - loop.time()))
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def counted(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` once more than ``limit`` body bytes arrived."""
    seen = 0

    async def receive_counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                if message.get("more_body"):
                    await drain(receive)
                raise BodyTooLarge(limit)
        return message

    return receive_counted


class Tokenizing:
    """Bounded tokenization off the event loop, one prompt at a time (a fast tokenizer must not
    be entered from several threads at once), counting the characters it tokenized."""

    def __init__(self, tokenizer, context: int, max_token_chars: int, on_chars: Callable[[int], None]) -> None:
        self.tokenizer = tokenizer
        self.char_limit = context * max_token_chars
        self.context = context
        self.on_chars = on_chars
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpserve-tokenize")

    def too_long(self, chars: int) -> bool:
        """More characters than ``context`` tokens can hold: too long, whatever they tokenize to."""
        return chars > self.char_limit

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.too_long(len(text)):
            raise PromptTooLong(f"the prompt has {len(text):,} characters, more than {self.context} tokens can hold")
        self.on_chars(len(text))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def run(self, fn: Callable, *args):
        """Other tokenizer work (a chat template) on the same thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
