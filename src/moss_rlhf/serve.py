"""``moss-rlhf serve MODEL``: an OpenAI-compatible HTTP API (FastAPI + uvicorn), so the official ``openai`` client
and tools built on it talk to our model unchanged.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``. Honoured: ``temperature``,
``top_p``, ``max_tokens``, ``n``, ``stop``, ``seed``, ``stream`` (server-sent events: ``chat.completion.chunk`` /
``text_completion`` chunks, then ``data: [DONE]``); every response carries token ``usage``. Refused with a clear
error rather than ignored: OpenAI fields this server cannot honour when a request sets them (``logprobs``, the
penalties, ``logit_bias``, tools, ``echo``, ``best_of``, ``suffix``, a JSON ``response_format``), and — with
OpenAI's 400, before anything is sampled — a prompt that leaves no room for ``max_tokens`` in the model's context.
Bound to 127.0.0.1 by default: the server has no authentication, so exposing it is an explicit choice
(``--host 0.0.0.0``).

One model serves one request at a time (a lock): a small model on a CPU gains nothing from interleaving requests.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models from the endpoint annotations at
# run time, and those models are defined inside create_app (pydantic and fastapi load only when serving).
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from moss_rlhf.config import Config, ConfigError, option


@dataclass
class ServeConfig(Config):
    model: str = option("runs/ppo/model", "model to serve (save_pretrained directory or hub id)", positional=True)
    name: str = option("", "model id reported by /v1/models (default: the model's directory name)")
    host: str = option("127.0.0.1", "interface to bind (0.0.0.0 exposes the unauthenticated API to the network)")
    port: int = option(8000, "TCP port")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for", at_least=1)
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")


def _sampling(body: Any, limit: int) -> dict:
    return {"temperature": float(body.temperature), "top_p": float(body.top_p),
            "max_new_tokens": min(int(body.max_tokens), limit)}


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# OpenAI request fields this server cannot honour, with the values that ask for nothing (what clients send by
# default); any other value is refused, since ignoring it would answer a different question than the one asked
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "function_call": (None, "none"), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "response_format": (None, {"type": "text"})}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(assistant, model_name: str, max_tokens_limit: int = 1024):
    """The FastAPI application around one :class:`moss_rlhf.assistant.Assistant`."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class ChatMessage(BaseModel):
        role: str
        content: str

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # other fields: checked against UNSUPPORTED, the rest ignored
        model: str = model_name
        messages: list[ChatMessage] = Field(min_length=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        max_tokens: int = Field(256, ge=1)
        n: int = Field(1, ge=1, le=16)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict | None = None

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str = model_name
        prompt: str | list[str]
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        max_tokens: int = Field(16, ge=1)
        n: int = Field(1, ge=1, le=16)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict | None = None

    app = FastAPI(title="moss-rlhf", description="OpenAI-compatible API of a moss-rlhf model")
    lock = threading.Lock()

    # Errors in OpenAI's shape ({"error": {"message", "type", ...}}), which its clients show to the user.
    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                            status_code=status)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # loc: ("body", character offset)
            at = first.get("loc", ("body", "?"))[-1]
            return error(400, f"the request body is not valid JSON (character {at}: "
                              f"{first.get('ctx', {}).get('error', first.get('msg'))})")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error(422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), where or None)
    created = int(time.time())

    def check_model(name: str) -> None:
        if name != model_name:
            raise HTTPException(404, f"model {name!r} is not served here; this server serves {model_name!r}")

    def check_request(body, prompts: list, param: str) -> None:
        """Refuse what the server cannot honour, before anything is sampled: a field of UNSUPPORTED set to ask for
        something, or a prompt that leaves no room for ``max_tokens`` in the model's context (OpenAI's 400)."""
        for name, value in (body.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise HTTPException(422, f"{name}: not supported by this server (got {value!r})")
        wanted = _sampling(body, max_tokens_limit)["max_new_tokens"]
        for i, prompt in enumerate(prompts):
            if (too_long := assistant.overflow(prompt, wanted)) is not None:
                length, context = too_long
                where = param if len(prompts) == 1 else f"{param}[{i}]"
                raise HTTPException(400, f"{where}: this model's context is {context} tokens; the prompt has {length} "
                                         f"and max_tokens asks for {wanted} more")

    def check_roles(messages: list) -> None:
        for i, m in enumerate(messages):
            if m.role not in ("system", "user", "assistant"):
                raise HTTPException(422, f"messages[{i}].role must be system, user or assistant, got {m.role!r}")

    def complete(prompts: list, body, n: int) -> list:
        """``n`` completions per prompt, in order (prompt 0's n choices first), one batch."""
        with lock:
            return assistant.complete([p for p in prompts for _ in range(n)], stop=_stops(body.stop), seed=body.seed,
                                      **_sampling(body, max_tokens_limit))

    def usage(completions: list, n: int) -> dict:
        prompt_tokens = sum(c.prompt_tokens for c in completions[::n])  # each prompt counted once
        completion_tokens = sum(c.completion_tokens for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def stream_events(prompts: list, body, n: int, chunk) -> Iterator[str]:
        """SSE: every choice's text pieces as they are generated (choice after choice), then — when the request
        asked for it with ``stream_options: {"include_usage": true}`` — a usage chunk, then [DONE]."""
        index = 0
        finished: list = []
        for prompt in prompts:
            for sample in range(n):
                seed = None if body.seed is None else body.seed + sample
                yield _sse(chunk(index, None, None, first=True))
                done_before = len(finished)
                with lock:
                    for piece in assistant.stream(prompt, stop=_stops(body.stop), seed=seed,
                                                  on_finish=finished.append, **_sampling(body, max_tokens_limit)):
                        yield _sse(chunk(index, piece, None))
                reason = finished[-1].finish_reason if len(finished) > done_before else "stop"
                yield _sse(chunk(index, None, reason))
                index += 1
        if (body.stream_options or {}).get("include_usage"):
            yield _sse({**chunk(0, None, None), "choices": [], "usage": usage(finished, n)})
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "moss-rlhf"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest):
        check_model(body.model)
        check_roles(body.messages)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        check_request(body, [messages], "messages")
        request_id, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> dict:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"id": request_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}

            return StreamingResponse(stream_events([messages], body, body.n, chunk), media_type="text/event-stream")
        completions = complete([messages], body, body.n)
        return {"id": request_id, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(completions)],
                "usage": usage(completions, body.n)}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise HTTPException(422, "prompt must not be an empty list")
        check_request(body, prompts, "prompt")
        request_id, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> dict:
                return {"id": request_id, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]}

            return StreamingResponse(stream_events(prompts, body, body.n, chunk), media_type="text/event-stream")
        done = complete(prompts, body, body.n)
        return {"id": request_id, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                            for i, c in enumerate(done)],
                "usage": usage(done, body.n)}

    return app


def model_id(path: str, given: str = "") -> str:
    from pathlib import Path

    if given:
        return given
    p = Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name or path


def run(cfg: ServeConfig) -> None:
    import uvicorn

    from moss_rlhf.assistant import Assistant

    assistant = Assistant.from_pretrained(cfg.model, device=cfg.device)
    name = model_id(cfg.model, cfg.name)
    print(f"serve: {cfg.model} as {name!r} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(assistant, name, cfg.max_tokens_limit), host=cfg.host, port=cfg.port, log_level="info")
