"""The client side of ``serve.py``: streamed requests with the arrival time of every content
chunk, closed-loop load, and the two probes (prefix reuse, admission stall)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "My favourite food is",
           "Water boils at", "The quick brown fox", "In 1969, humans", "The largest planet in the solar system is",
           "To make a cup of tea, first", "Dear Sir or Madam,", "The meaning of life is",
           "SELECT * FROM users WHERE", "Photosynthesis is the process", "One, two, three,"]
QUESTIONS = ["Summarise the notes above in one sentence.", "Which city is mentioned first?",
             "What does the text say about bridges?", "List three topics from the notes.",
             "Write a short title for these notes.", "What is said about the harbour?",
             "Explain the part about clocks to a child.", "Which sentence is about food?"]
SENTENCES = [  # the long texts are these, in seeded orders: varied enough not to be one repeated token run
    "The harbour town of Vell kept its lighthouse lit with whale oil until the winter of 1871.",
    "A suspension bridge carries its deck on vertical hangers that hang from two main cables.",
    "Bakers in the old quarter start their ovens at four, long before the first tram leaves the depot.",
    "Pendulum clocks lose time in summer because the rod grows longer as it warms.",
    "Her grandmother's recipe for plum dumplings called for cinnamon, breadcrumbs and a pinch of salt.",
    "Binary search halves the interval at each step, so a million sorted items need about twenty probes.",
    "Copper roofs turn green as the metal reacts with air and water to form a thin patina.",
    "A good sourdough starter smells faintly of apples and doubles in size within six hours.",
    "The river was diverted in 1904 so that the railway could run along its old bed.",
    "Every spring the students repaint the stone lion outside the library in a new colour.",
    "Tidal power stations use the rise and fall of the sea to turn turbines in both directions.",
    "He kept a notebook of every bird he saw, with the weather and the time written beside it.",
    "Glass is made by melting sand with soda ash and lime, then cooling it before it can crystallise.",
    "A compiler turns source code into machine instructions, often in several separate passes.",
    "Migrating geese fly in a V so that each bird rides the updraft from the wingtip ahead.",
    "The old mill still grinds flour on open days, powered by the same stream as in 1790.",
]


@dataclass
class Stream:
    """One streamed request: when it was sent, when each chunk bringing a token arrived, when it ended."""
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)
    done: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    def gaps(self) -> list[tuple[float, float]]:
        return list(zip(self.chunks, self.chunks[1:]))


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation between the few samples a run has)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


def long_text(tokenizer, target: int = 1500, seed: int = 0) -> str:
    """Whole sentences in a seeded order until the text is ``target`` tokens (at most one
    sentence, < 50 tokens, more)."""
    rng, parts = random.Random(seed), []
    while True:
        order = SENTENCES[:]
        rng.shuffle(order)
        for s in order:
            parts.append(s)
            n = len(tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"])
            if n >= target:
                assert n <= target + 50, n
                return " ".join(parts)


def _common(max_tokens: int) -> dict:
    return {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0, "ignore_eos": True,
            "max_tokens": max_tokens}


def completion(model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    return "/v1/completions", {"model": model, "prompt": prompt, **_common(max_tokens)}


def chat(model: str, system: str, user: str, max_tokens: int) -> tuple[str, dict]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return "/v1/chat/completions", {"model": model, "messages": messages, **_common(max_tokens)}


def carries_token(choice: dict) -> bool:
    """Whether a streamed choice brings a token: text, or an empty piece (a token that completes no
    character yet; vLLM and tpserve stream one chunk per token), not a chat's role chunk or a
    finish on its own."""
    delta = choice.get("delta")
    if delta is not None:
        return bool(delta.get("content")) or ("content" in delta and "role" not in delta
                                              and choice.get("finish_reason") is None)
    return bool(choice.get("text")) or ("text" in choice and choice.get("finish_reason") is None)


async def send(http: httpx.AsyncClient, path: str, body: dict, s: Stream | None = None) -> Stream:
    """Stream one request into ``s``; raise unless it ends with exactly max_tokens tokens."""
    s = s or Stream()
    s.sent = time.perf_counter()
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"{path}: {obj['error']}")
            if any(carries_token(c) for c in obj.get("choices") or []):
                s.chunks.append(now)
            if obj.get("usage"):
                s.tokens = obj["usage"]["completion_tokens"]
    s.done = time.perf_counter()
    if s.tokens != body["max_tokens"] or not s.chunks:
        raise RuntimeError(f"{path}: asked for {body['max_tokens']} tokens, got {s.tokens} in {len(s.chunks)} chunks")
    return s


def client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 2, max_keepalive_connections=connections + 2)
    return httpx.AsyncClient(base_url=url, timeout=900, limits=limits)


async def closed_loop(url: str, make, clients: int, per_client: int) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another,
    after a warm-up round of one request per client (not counted); ``make(i)`` is request i's
    (path, body), i < 0 for warm-ups."""
    done: list[Stream] = []

    async def one(http: httpx.AsyncClient, c: int) -> None:
        for k in range(per_client):
            done.append(await send(http, *make(c * per_client + k)))

    async with client(url, clients) as http:
        await asyncio.gather(*[send(http, *make(-1 - c)) for c in range(clients)])
        t0 = time.perf_counter()
        await asyncio.gather(*[one(http, c) for c in range(clients)])
        wall = time.perf_counter() - t0
    ttft = [s.ttft for s in done]
    itl = [b - a for s in done for a, b in s.gaps()]
    e2e = [s.done - s.sent for s in done]
    tokens = sum(s.tokens for s in done)
    return {"clients": clients, "requests": len(done), "tok_s": tokens / wall, "wall": wall,
            "ttft": [percentile(ttft, p) for p in (50, 90, 99)], "itl": [percentile(itl, p) for p in (50, 99)],
            "e2e": [percentile(e2e, p) for p in (50, 99)], "per_chunk": tokens / sum(len(s.chunks) for s in done)}


async def prefix_probe(url: str, model: str, system: str) -> dict:
    """One client, five chat requests in turn with the same system prompt and different user
    messages: TTFT of the first (its prefix cold) against the median of the other four. One short
    unrelated completion goes first, so first-request costs that are not the prefix's are paid."""
    async with client(url, 1) as http:
        await send(http, *completion(model, PROMPTS[0], 2))
        ttft = [(await send(http, *chat(model, system, f"{QUESTIONS[k]} (probe {k})", 4))).ttft for k in range(5)]
    later = statistics.median(ttft[1:])
    return {"first": ttft[0], "later": later, "ratio": later / ttft[0]}


async def admission_probe(url: str, model: str, long_prompt: str, streams: int = 8, after: int = 20) -> dict:
    """``streams`` short prompts decoding 256 tokens; once each has ``after`` token chunks, one
    long prompt (max_tokens 8) is sent. Window = from sending it to its first token. Worst gap of
    the running streams overlapping the window, against the median gap of those streams in the
    window of equal length just before (gaps starting after every stream had its first chunk)."""
    running = [Stream() for _ in range(streams)]
    async with client(url, streams + 1) as http:
        tasks = [asyncio.create_task(send(http, *completion(model, PROMPTS[i % len(PROMPTS)], 256), s))
                 for i, s in enumerate(running)]
        try:
            while min(len(s.chunks) for s in running) < after:
                for t in tasks:
                    if t.done():
                        t.result()  # raises what it raised; a stream cannot end this early otherwise
                await asyncio.sleep(0.01)
            long = await send(http, *completion(model, long_prompt, 8))
            t_send, t_first = long.sent, long.chunks[0]
            deadline = time.perf_counter() + 60
            while any(not s.done and s.chunks[-1] <= t_first for s in running) and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)  # the gap spanning t_first has to be complete
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    window = t_first - t_send
    during = [b - a for s in running for a, b in s.gaps() if b > t_send and a < t_first]
    start = max(t_send - window, max(s.chunks[0] for s in running))
    before = [b - a for s in running for a, b in s.gaps() if a >= start and b <= t_send]
    if not before:  # a window shorter than one step: the last gap of each stream before it
        before = [next(b - a for a, b in reversed(s.gaps()) if b <= t_send) for s in running]
    worst, median = max(during, default=math.nan), statistics.median(before)
    alive = sum(not s.done or s.done > t_first for s in running)  # streams that ended inside it did not see it all
    return {"window": window, "worst": worst, "median": median, "ratio": worst / median, "alive": alive}
