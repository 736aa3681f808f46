"""The HTTP layer: OpenAI's completions API (and vLLM's extras) over the engine loop.

It only parses, validates and streams; the model and the cache belong to the engine thread
(``engine.py``). Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (400
unless a chat template was given), ``GET /v1/models``, ``GET /health``, ``GET /metrics``,
``POST /tokenize``, ``POST /detokenize``. Errors use OpenAI's envelope everywhere; bad fields
are 400 (never 422), an unknown model 404, a full queue 429 with ``Retry-After``, a body over
``max_body_bytes`` 413, a missing or wrong key 401 (compared in constant time). A client
that goes away has its request aborted, which frees its rows before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from torch import nn

from flagopt.predictor.params import GenerationParams
from flagopt.serve.engine import Engine
from flagopt.serve.metrics import Metrics
from flagopt.serve.protocol import APIError, ChatRequest, CompletionRequest, \
    DetokenizeRequest, TokenizeRequest, param_error, parse
from flagopt.serve.scheduler import MAX_LOGPROBS, Event, QueueFullError, Request as Job, \
    Scheduler, TokenLogprob
from flagopt.tokenizer import OPTTokenizer

logger = logging.getLogger("flagopt.serve")

MAX_BODY_BYTES = 2 * 2 ** 20
# GenerationParams' names as the API calls them, for error messages.
_API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
              "num_return_sequences": "n", "eos_token_ids": "stop_token_ids"}


@dataclass
class _Choice:
    """One choice's text and tokens as they arrive."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    length: int = 0  # characters of text so far
    finish_reason: str | None = None


class Service:
    """Everything the endpoints share: the engine, the tokenizer, limits, metrics."""

    def __init__(self, model: nn.Module, tokenizer: OPTTokenizer, *, served_model_name: str,
                 api_key: str | None, max_batch_size: int, max_queue: int,
                 max_model_len: int | None, max_tokens_default: int, max_body_bytes: int,
                 chat_template: str | None, cache_dtype, draft=None) -> None:
        self.scheduler = Scheduler(model, tokenizer, max_batch_size=max_batch_size,
                                   max_queue=max_queue, max_model_len=max_model_len,
                                   cache_dtype=cache_dtype, draft=draft)
        self.engine = Engine(self.scheduler)
        self.tokenizer = tokenizer
        self.model_name = served_model_name
        self.api_key = api_key
        self.max_model_len = self.scheduler.max_model_len
        self.max_tokens_default = max_tokens_default
        self.max_body_bytes = max_body_bytes
        self.chat_template = chat_template
        self.metrics = Metrics()
        self.shutting_down = False
        self.created = int(time.time())

    # --- checks ---------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down")
        if not self.engine.healthy:
            raise APIError(503, "the engine stopped; see the server's log")

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.model_name}` (see /v1/models)", param="model")

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"the body has {declared} bytes; the limit is "
                                f"{self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"the body is over the limit of {self.max_body_bytes} "
                                    f"bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # --- requests -------------------------------------------------------------------------

    def prompts(self, prompt: object) -> list[tuple[str, list[int]]]:
        """(text, ids) of each prompt: a string, strings, token ids or lists of them."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        out = []
        vocab = self.scheduler.model.config.vocab_size
        for p in prompt:
            if isinstance(p, str):
                out.append((p, self.tokenizer.encode_prompt(p)))
                continue
            if not p:
                raise APIError(400, "prompt holds an empty list of token ids", param="prompt")
            bad = [i for i in p if not 0 <= i < vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"[0, {vocab})", param="prompt")
            out.append((self.tokenizer.decode(p), list(p)))
        return out

    def job(self, req: CompletionRequest, ids: list[int], job_id: str,
            max_tokens: int | None) -> Job:
        """A scheduler request for one prompt, every field validated (400s here)."""
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported (OPT has no insertion mode)",
                           param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of={req.best_of} is not supported; only best_of=n "
                                f"(or leaving it out)", param="best_of")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs={req.logprobs} is out of range; expected 0 to "
                                f"{MAX_LOGPROBS}", param="logprobs")
        if req.n > self.scheduler.max_batch_size:
            raise APIError(400, f"n={req.n} is out of range; expected 1 to "
                                f"{self.scheduler.max_batch_size} (--max-batch-size)",
                           param="n")
        max_tokens = self.budget(len(ids), max_tokens, req.echo)
        top_k = req.top_k if req.top_k not in (None, -1) else 0  # vLLM: -1 is off
        eos = () if req.ignore_eos else (self.scheduler.model.config.eos_token_id,)
        fields = dict(temperature=req.temperature, top_p=req.top_p, min_p=req.min_p,
                      repetition_penalty=req.repetition_penalty,
                      presence_penalty=req.presence_penalty,
                      frequency_penalty=req.frequency_penalty)
        try:
            params = GenerationParams(
                strategy="sample", max_new_tokens=max(max_tokens, 1), top_k=top_k,
                num_return_sequences=req.n, min_new_tokens=req.min_tokens, seed=req.seed,
                eos_token_ids=eos + tuple(req.stop_token_ids or ()), stop=req.stop,
                **{k: v for k, v in fields.items() if v is not None},
                caller_names=_API_NAMES)
        except (TypeError, ValueError) as exc:
            raise param_error(exc) from None
        return Job(job_id, ids, params, max_tokens, req.logprobs,
                   prompt_logprobs=req.echo and req.logprobs is not None)

    def budget(self, prompt_len: int, max_tokens: int | None, echo: bool) -> int:
        """``max_tokens`` as given (checked against the context) or the default, clamped."""
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            if room >= 1:
                return min(self.max_tokens_default, room)
            max_tokens = self.max_tokens_default
        elif max_tokens < 0 or (max_tokens == 0 and not echo):
            raise APIError(400, f"max_tokens={max_tokens} is out of range; expected >= 1 "
                                f"(0 only with echo=true, to score the prompt)",
                           param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"You passed {prompt_len} input tokens and requested "
                                f"{max_tokens} output tokens. However, the model's context "
                                f"length is only {self.max_model_len} tokens, resulting in a "
                                f"maximum input length of {max(self.max_model_len - max_tokens, 0)}"
                                f" tokens. Please reduce the length of the input prompt.",
                           param="max_tokens")
        return max_tokens

    def submit(self, jobs: list[Job]) -> asyncio.Queue:
        """Hand the jobs to the engine; their events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done = []
        try:
            for job in jobs:
                self.engine.submit(job, lambda e: loop.call_soon_threadsafe(
                    events.put_nowait, e))
                done.append(job)
        except QueueFullError as exc:
            for job in done:
                self.engine.abort(job.request_id)
            raise APIError(429, f"the server is busy ({exc}); retry shortly",
                           headers={"Retry-After": "1"}) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc)) from None
        return events

    # --- shaping the answers --------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs_json(self, entries: list[TokenLogprob], offsets: list[int]) -> dict:
        return {"tokens": [self.token_text(e.token_id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else self.top_json(e)
                                 for e in entries],
                "text_offset": offsets}

    def top_json(self, entry: TokenLogprob) -> dict[str, float]:
        """``entry``'s alternatives and itself, by token text. Two ids with one text (byte
        tokens that decode to U+FFFD) keep the larger value, so ``token_logprob ==
        max(top_logprobs)`` stays true exactly when the token was the argmax (lm-eval's
        ``is_greedy`` test)."""
        out: dict[str, float] = {}
        for token_id, value in {**entry.top, entry.token_id: entry.logprob}.items():
            text = self.token_text(token_id)
            out[text] = max(value, out.get(text, value))
        return out

    def echo_logprobs(self, prompt: list[TokenLogprob], text: str) -> tuple[list, list[int]]:
        """The prompt's entries and their offsets in the echoed ``text``."""
        offsets, at = [], 0
        for entry in prompt:
            offsets.append(min(at, len(text)))
            at += len(self.tokenizer.decode([entry.token_id]))
        return prompt, offsets


def create_app(model: nn.Module, tokenizer: OPTTokenizer, *, served_model_name: str,
               api_key: str | None = None, max_batch_size: int = 16, max_queue: int = 64,
               max_model_len: int | None = None, max_tokens_default: int = 16,
               max_body_bytes: int = MAX_BODY_BYTES, chat_template: str | None = None,
               cache_dtype=None, draft: nn.Module | str | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` as ``served_model_name`` (engine thread included:
    it starts and stops with the app's lifespan).

    Args:
        model: an ``OPTForCausalLM`` in eval mode; tokenizer: its tokenizer.
        served_model_name: the ``model`` clients send.
        api_key: when given, every endpoint but /health and /metrics needs
            ``Authorization: Bearer <api_key>``.
        max_batch_size: cache rows (choices decoded together); max_queue: requests that
            may wait for rows (more get 429).
        max_model_len: positions per request (prompt + completion); default the model's.
        max_tokens_default: ``max_tokens`` when a request leaves it out (clamped to fit).
        max_body_bytes: larger request bodies get 413.
        chat_template: a Jinja chat template (Hugging Face's format) for
            /v1/chat/completions; without one that endpoint answers 400.
        cache_dtype: the KV cache's dtype; None is the model's own.
        draft: speculative decoding: a smaller causal LM sharing the tokenizer, or
            ``"int8"`` for the model's own weights in int8 (same output, see
            ``Scheduler``); its acceptance figures are in /metrics.
    """
    service = Service(model, tokenizer, served_model_name=served_model_name, api_key=api_key,
                      max_batch_size=max_batch_size, max_queue=max_queue,
                      max_model_len=max_model_len, max_tokens_default=max_tokens_default,
                      max_body_bytes=max_body_bytes, chat_template=chat_template,
                      cache_dtype=cache_dtype, draft=draft)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop(timeout=5)

    app = FastAPI(title="flagopt", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error answering %s", request.url.path)
        return JSONResponse(APIError(500, f"{type(exc).__name__}: {exc}").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> Response:
        ok = service.engine.healthy and not service.shutting_down
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        engine = service.engine
        text = service.metrics.render(service.model_name, engine.num_running,
                                      engine.num_waiting, engine.prompt_tokens,
                                      engine.generated_tokens, service.scheduler.speculative)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        service.check_auth(request)
        return {"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created,
            "owned_by": "flagopt", "root": service.model_name,
            "max_model_len": service.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        service.check_auth(request)
        req = parse(TokenizeRequest, await service.body(request))
        service.check_model(req.model)
        ids = tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": service.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        service.check_auth(request)
        req = parse(DetokenizeRequest, await service.body(request))
        service.check_model(req.model)
        try:
            return {"prompt": tokenizer.decode(req.tokens)}
        except ValueError as exc:
            raise APIError(400, str(exc), param="tokens") from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        service.check_open()
        service.check_auth(request)
        req = parse(CompletionRequest, await service.body(request))
        service.check_model(req.model)
        return await _complete(service, request, req, service.prompts(req.prompt))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        service.check_open()
        service.check_auth(request)
        req = parse(ChatRequest, await service.body(request))
        service.check_model(req.model)
        if service.chat_template is None:
            raise APIError(400, "OPT has no chat template: it is a plain language model. "
                                "Send the conversation as text to /v1/completions, or start "
                                "the server with --chat-template FILE.", param="messages")
        from flagopt.serve.chat import render

        prompt = render(service.chat_template, req.messages, tokenizer)
        req = req.model_copy(update=dict(
            max_tokens=req.max_completion_tokens or req.max_tokens,
            logprobs=None, echo=False))
        return await _complete(service, request, req,
                               [(prompt, tokenizer.encode_prompt(prompt))], chat=True)

    return app


async def _complete(service: Service, request: Request, req: CompletionRequest,
                    prompts: list[tuple[str, list[int]]], chat: bool = False) -> Response:
    started = time.monotonic()
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    jobs = [service.job(req, ids, f"{cid}-{i}", req.max_tokens)
            for i, (_, ids) in enumerate(prompts)]
    events = service.submit(jobs)
    run = _Run(service, req, prompts, jobs, cid, started, chat)
    if req.stream:
        return StreamingResponse(run.stream(request, events), media_type="text/event-stream")
    return await run.collect(request, events)


class _Run:
    """One HTTP request's jobs: gathers their events into choices, streams or answers."""

    def __init__(self, service: Service, req: CompletionRequest,
                 prompts: list[tuple[str, list[int]]], jobs: list[Job], cid: str,
                 started: float, chat: bool) -> None:
        self.service, self.req, self.prompts, self.jobs = service, req, prompts, jobs
        self.cid, self.started, self.chat = cid, started, chat
        self.created = int(time.time())
        self.index = {job.request_id: i for i, job in enumerate(jobs)}
        self.choices = [_Choice() for _ in range(len(jobs) * req.n)]
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def choice_of(self, event: Event) -> int:
        return self.index[event.request_id] * self.req.n + event.index

    async def events(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[Event]:
        """Events until every choice finished; aborts everything if the client leaves."""
        try:
            while not self.finished:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        logger.info("%s went away: request %s aborted", self._client(request),
                                    self.cid)
                        self.service.metrics.request_done("abort")
                        return
                    continue
                if self.first_token_at is None and event.token_ids:
                    self.first_token_at = time.monotonic()
                    self.service.metrics.ttft.observe(self.first_token_at - self.started)
                yield event
        finally:
            for job in self.jobs:  # frees the rows of whatever did not finish
                self.service.engine.abort(job.request_id)

    def apply(self, event: Event) -> tuple[int, str, list[TokenLogprob], list[int]]:
        """Record ``event``; its choice, the text to emit, and its logprob entries/offsets."""
        k = self.choice_of(event)
        choice = self.choices[k]
        text, entries, offsets = "", [], []
        if self.req.echo and not choice.text:  # the choice's first event: the prompt first
            prompt_text = self.prompts[k // self.req.n][0]
            text = prompt_text
            if event.prompt_logprobs is not None:
                entries, offsets = self.service.echo_logprobs(event.prompt_logprobs,
                                                              prompt_text)
            elif self.req.logprobs is not None:  # choices > 0 repeat choice 0's prompt
                first = self.choices[k - event.index]
                entries = first.logprobs[:len(self.jobs[k // self.req.n].prompt_ids)]
                offsets = first.offsets[:len(entries)]
        choice.length += len(text)
        for entry, at in zip(event.logprobs, event.text_offsets):  # one offset per token
            entries.append(entry)
            offsets.append(choice.length + at)
        text += event.text
        choice.length += len(event.text)
        choice.text.append(text)
        choice.tokens += len(event.token_ids)
        choice.logprobs += entries
        choice.offsets += offsets
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            if event.finish_reason == "error":
                raise APIError(500, f"generation failed: {event.error}")
        return k, text, entries, offsets

    def usage(self) -> dict:
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def choice_json(self, k: int, text: str, entries: list, offsets: list[int],
                    finish_reason: str | None, delta: bool) -> dict:
        if self.chat:
            body = {"delta" if delta else "message": {"role": "assistant", "content": text}}
            return {"index": k, **body, "logprobs": None, "finish_reason": finish_reason}
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = self.service.logprobs_json(entries, offsets)
        return {"index": k, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.cid, "object": kind, "created": self.created,
                "model": self.service.model_name, "choices": choices}

    async def collect(self, request: Request, queue: asyncio.Queue) -> Response:
        async for event in self.events(request, queue):
            self.apply(event)
        if not self.finished:  # the client left
            return Response(status_code=499)
        body = self.envelope([self.choice_json(k, "".join(c.text), c.logprobs, c.offsets,
                                               c.finish_reason, delta=False)
                              for k, c in enumerate(self.choices)], chunk=False)
        body["usage"] = self.usage()
        self.done(request)
        return JSONResponse(body)

    async def stream(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[str]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        try:
            async for event in self.events(request, queue):
                k, text, entries, offsets = self.apply(event)
                if not text and not entries and event.finish_reason is None:
                    continue
                frame = self.envelope([self.choice_json(k, text, entries, offsets,
                                                        event.finish_reason, delta=True)],
                                      chunk=True)
                if include_usage:
                    frame["usage"] = None
                yield _sse(frame)
            if not self.finished:
                return
            if include_usage:
                frame = self.envelope([], chunk=True)
                frame["usage"] = self.usage()
                yield _sse(frame)
            self.done(request)
        except APIError as exc:  # mid-stream: a final error event
            logger.error("request %s failed: %s", self.cid, exc.message)
            yield _sse(exc.body())
        yield "data: [DONE]\n\n"

    def done(self, request: Request) -> None:
        elapsed = time.monotonic() - self.started
        metrics = self.service.metrics
        metrics.latency.observe(elapsed)
        for c in self.choices:
            metrics.request_done(c.finish_reason or "abort")
        usage = self.usage()
        logger.info('%s "POST %s" 200 %s prompt_tokens=%d completion_tokens=%d %.3fs',
                    self._client(request), request.url.path, self.cid,
                    usage["prompt_tokens"], usage["completion_tokens"], elapsed)

    @staticmethod
    def _client(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "-"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def read_chat_template(path: str | Path) -> str:
    """The text of a ``--chat-template`` file (Jinja, as Hugging Face writes them)."""
    return Path(path).read_text(encoding="utf-8")
