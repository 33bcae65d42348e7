"""`peftkit serve`: one base, many adapters, over HTTP (FastAPI + uvicorn).

Endpoints: `GET /health`; `GET/POST /v1/adapters`, `DELETE /v1/adapters/{name}` (runtime load/unload/hot-swap);
`POST /v1/predict` (task answers, any task); OpenAI-compatible `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` for generative bases, where `model` names the adapter. Every request goes through
the micro-batcher, so concurrent requests for different adapters share one mixed-adapter forward pass.
Errors are JSON `{"error": {"message", "type", "code"}}` with a 4xx status; the server keeps running.

Security (see docs/reliability.md): an optional bearer token on every endpoint (401), a request body limit (413),
per-input and generation token limits (422), and runtime adapter loading only from operator-allowed roots (403).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.data.formats import MESSAGE_ROLES
from peftkit.deploy.adapter_folder import find_adapter
from peftkit.deploy.attach import BASE_ADAPTER, AttachedModel, InputTooLong, UnknownAdapter, check_adapter_name
from peftkit.deploy.batching import MicroBatcher, Request
from peftkit.errors import UserError
from peftkit.tasks import causal_lm
from peftkit.tasks.generation import TokenStream, end_tokens

MAX_INPUTS_PER_REQUEST = 256
MAX_CHOICES = 16  # OpenAI `n`
TOKEN_ENV = "PEFTKIT_SERVE_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_INTERFACE = ("0.0.0.0", "::", "")

log = logging.getLogger("peftkit")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; the CLI's `--max-*` options."""

    body_bytes: int = 1 << 20  # 1 MiB of JSON holds hundreds of long inputs
    input_tokens: int = 4096  # per input row (all its fields together)
    new_tokens: int = 512  # per generated answer


class Unauthorized(UserError):
    """No or a wrong bearer token (HTTP 401)."""


class Forbidden(UserError):
    """A runtime adapter path outside the allowed roots, or runtime loading disabled (HTTP 403)."""


class OverLimit(UserError):
    """A request asks for more tokens than the server allows (HTTP 422)."""


class Unsupported(UserError):
    """An OpenAI request field this server does not implement, set to a value that changes the answer (HTTP 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


STATUS = {Unauthorized: 401, Forbidden: 403, UnknownAdapter: 404, InputTooLong: 422, OverLimit: 422}


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields (user, metadata, store) that change nothing


class PredictBody(BaseModel):
    # peftkit's own endpoint: a field it does not know (a typo, or `model` as the OpenAI endpoints name the adapter)
    # would otherwise be ignored and the active adapter would answer in its place
    model_config = ConfigDict(extra="forbid")
    inputs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)
    adapter: str | None = Field(None, description="Adapter for every input; an input's own `adapter` field wins.")
    max_new_tokens: int | None = Field(None, gt=0, description="Unset: each adapter's run's generation.max_new_tokens.")


class StreamOptions(Body):
    include_usage: bool = False


# OpenAI fields that would change the answer but are not implemented: (field, value that is the same as leaving it out)
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]),
}


class GenerationBody(Body):
    model_config = ConfigDict(extra="allow")  # kept, so that fields which would change the answer can be refused
    model: str
    max_tokens: int | None = Field(None, gt=0, description="Unset: the adapter's run's generation.max_new_tokens.")
    max_completion_tokens: int | None = Field(None, gt=0, description="OpenAI's newer name for max_tokens; wins over it.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 or unset decodes as the run's evaluation did.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences; the text is cut before the first.")
    seed: int | None = Field(None, description="With temperature > 0: the same seed gives the same text.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def model_post_init(self, _context) -> None:
        for field, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(field)
            if value not in neutral:
                raise Unsupported(field, f"`{field}` is not supported by this server; leave it out (see docs/deploy.md)")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise Unsupported("stop", "at most 4 `stop` sequences")
        if self.stream and self.n > 1:
            raise Unsupported("n", "`n` > 1 cannot be streamed; send `stream: false` or n = 1")

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def sampling(self) -> tuple:
        if not self.temperature:
            return ()  # decode as the run's evaluation did
        return (("temperature", self.temperature), ("top_p", self.top_p or 1.0), ("seed", self.seed))


class CompletionBody(GenerationBody):
    prompt: str | list[str] = Field(min_length=1)


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal[MESSAGE_ROLES]  # a misspelt role would reach the chat template, which renders any name
    content: str | list[TextPart] | None = Field(None, description="Text, or a list of text parts (joined).")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)


class AdapterBody(Body):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


def build_app(
    attached: AttachedModel, window_ms: float = 5.0, max_batch_rows: int = 32, limits: Limits = Limits(),
    token: str | None = None, adapter_roots: list[str] = (), allowed_hosts: list[str] | None = LOOPBACK_NAMES,
) -> FastAPI:
    """The app; `token` (if set) is required as `Authorization: Bearer`, `adapter_roots` (if any) allow runtime loads.

    `allowed_hosts` are the names the `Host` header may carry (None: any), so that a web page cannot reach a
    loopback server through a DNS name of its own (DNS rebinding).
    """
    batcher = MicroBatcher(attached, window_ms, max_batch_rows)
    roots = [Path(root).expanduser().resolve() for root in adapter_roots]

    def require_token(authorization: str | None = Header(None)) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest takes as long for a wrong token as for a right one, so timing does not leak it
        if token is not None and not (scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())):
            raise Unauthorized("missing or wrong bearer token: send the header `Authorization: Bearer <token>`")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    # No /docs, /redoc or /openapi.json: they would be the only endpoints a token does not guard.
    app = FastAPI(title="peftkit", lifespan=lifespan, dependencies=[Depends(require_token)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.body_bytes)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.state.batcher = batcher

    @app.exception_handler(UserError)
    async def user_error(_request: HttpRequest, error: UserError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(error, kind)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        return _error(status, str(error), kind, headers, param=getattr(error, "param", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: HttpRequest, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5])
        if any(e["type"] == "extra_forbidden" and e["loc"][-1] == "model" for e in error.errors()):
            problems += " (POST /v1/predict names the adapter in `adapter`, not `model`)"
        return _error(400, f"malformed request: {problems}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: HttpRequest, error: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(error.status_code, str(error.detail))
        return _error(error.status_code, message, "invalid_request_error", error.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: HttpRequest, error: Exception) -> JSONResponse:
        reference = uuid.uuid4().hex[:12]
        log.error("request failed (reference %s)", reference, exc_info=error)  # details for the operator only
        return _error(500, f"internal server error (reference {reference} in the server log)", "server_error")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok", "base": attached.base, "task": attached.task_type, "active": attached.active,
            "adapters": sorted(attached.adapters), "batching": vars(batcher.stats),
        }

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"adapters": [
            {"name": name, "path": str(source.path), "task": source.task, "active": name == attached.active,
             "base": (source.base or {}).get("name")}
            for name, source in attached.adapters.items()
        ]}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterBody) -> dict:
        check_adapter_name(body.name)
        replaced = body.name in attached.adapters
        resolved = allowed_adapter_path(body.name, body.path, roots)
        try:
            source = await asyncio.to_thread(attached.load, body.name, resolved)
        except UserError as error:  # name the path as the client gave it, not where it lies on this machine
            raise type(error)(str(error).replace(resolved, body.path)) from None
        return {"name": body.name, "task": source.task, "replaced": replaced}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        await asyncio.to_thread(attached.unload, name)
        return {"name": name, "unloaded": True}

    @app.post("/v1/predict")
    async def predict(body: PredictBody) -> dict:
        known = {*attached.task.INPUT_FIELDS, "adapter"} if attached.task_type else None
        for i, row in enumerate(body.inputs):
            if row.get("adapter") is not None and not isinstance(row["adapter"], str):
                raise UserError(f"inputs.{i}.adapter: expected an adapter name (a string), got {type(row['adapter']).__name__}")
            if known and set(row) - known:  # a misspelt optional field (`text_par`) would be left out of the prediction
                raise UserError(f"inputs.{i}: unknown field(s) {sorted(set(row) - known)}; an input holds {sorted(known)}")
        rows = [{k: v for k, v in row.items() if k != "adapter"} for row in body.inputs]
        adapters = attached.resolve(len(rows), [row.get("adapter") or body.adapter or attached.active for row in body.inputs])
        limits_per_row = None
        if attached.task.GENERATES:
            if body.max_new_tokens is not None:
                _check_new_tokens(body.max_new_tokens, limits, "max_new_tokens")
            limits_per_row = [_new_tokens(attached, name, body.max_new_tokens, limits) for name in adapters]
        attached.check_rows(rows, reserve_tokens=max(limits_per_row or [0]), max_input_tokens=limits.input_tokens)
        return {"predictions": await batcher.submit(Request(rows, adapters, limits_per_row))}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "peftkit"} for name in [*attached.adapters, BASE_ADAPTER]
        ]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) > 1:
            raise Unsupported("prompt", "a list of prompts cannot be streamed; send one prompt or `stream: false`")
        request = _generation_request(attached, body, prompts, limits)
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return _event_stream(attached, batcher, request, body, identity, chat=False)
        answers = [_apply_stop(answer, body.stop) for answer in await batcher.submit(request)]
        return {
            **identity, "object": "text_completion",
            "choices": [
                {"index": i, "text": answer["text"], "logprobs": None, "finish_reason": answer["finish_reason"]}
                for i, answer in enumerate(answers)
            ],
            "usage": _usage(attached, prompts, answers),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        prompt = causal_lm.prompt_from_messages(attached.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        request = _generation_request(attached, body, [prompt], limits)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return _event_stream(attached, batcher, request, body, identity, chat=True)
        answers = [_apply_stop(answer, body.stop) for answer in await batcher.submit(request)]
        return {
            **identity, "object": "chat.completion",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": answer["text"]}, "finish_reason": answer["finish_reason"]}
                for i, answer in enumerate(answers)
            ],
            "usage": _usage(attached, [prompt], answers),
        }

    return app


def allowed_adapter_path(name: str, path: str, roots: list[Path]) -> str:
    """The adapter folder `path` names, resolved (symlinks followed) and inside an allowed root; Forbidden otherwise.

    A relative path is looked up under each root in turn. The folder must stay inside a root after resolving, and
    so must the run folder's `adapter/` and every file in the adapter folder.
    """
    if not roots:
        raise Forbidden("runtime adapter loading is disabled; start the server with --adapter-root DIR to allow it")
    given = Path(path).expanduser()
    candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
    inside = [candidate for candidate in candidates if _inside(candidate, roots)]
    if not inside:
        raise Forbidden(f"adapter {name!r}: `{path}` is outside the allowed adapter roots")
    folder = next((candidate for candidate in inside if candidate.exists()), inside[0])
    source = find_adapter(name, str(folder))
    escaping = [p.name for p in [source.path, *source.path.iterdir()] if not _inside(p.resolve(), roots)]
    if escaping:
        raise Forbidden(f"adapter {name!r}: `{path}` links outside the allowed adapter roots ({', '.join(escaping)})")
    return str(source.path.resolve())


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _check_new_tokens(requested: int, limits: Limits, field: str) -> None:
    if requested > limits.new_tokens:
        raise OverLimit(f"{field} {requested} exceeds this server's limit of {limits.new_tokens} generated tokens")


def _new_tokens(attached: AttachedModel, adapter: str, requested: int | None, limits: Limits) -> int:
    """The tokens a row may generate: what the request asked, else what the adapter's run evaluated with (capped)."""
    return requested if requested is not None else min(attached.generation(adapter).max_new_tokens, limits.new_tokens)


def _generation_request(attached: AttachedModel, body: GenerationBody, prompts: list[str], limits: Limits) -> Request:
    """A checked batcher request for an OpenAI body: `n` rows per prompt, each with the adapter `model` names."""
    if not attached.task.COMPLETES_PROMPTS:
        raise UserError(f"this server serves {attached.task_type} adapters, which do not generate text; use POST /v1/predict")
    if len(prompts) * body.n > MAX_INPUTS_PER_REQUEST:
        raise UserError(f"at most {MAX_INPUTS_PER_REQUEST} prompts × n per request")
    if body.new_tokens is not None:
        _check_new_tokens(body.new_tokens, limits, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    rows = [{"prompt": prompt} for prompt in prompts for _ in range(body.n)]
    adapters = attached.resolve(len(rows), [body.model] * len(rows))
    new_tokens = _new_tokens(attached, body.model, body.new_tokens, limits)
    attached.check_rows(rows, reserve_tokens=new_tokens, max_input_tokens=limits.input_tokens)
    return Request(rows, adapters, [new_tokens] * len(rows), body.sampling)


def _event_stream(attached: AttachedModel, batcher: MicroBatcher, request: Request, body: GenerationBody,
                  identity: dict, chat: bool) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: a chunk per decoding step, the finish reason, usage if asked, [DONE].

    Text that could be the start of a `stop` sequence, or an incomplete character, is held back until it is not.
    """
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[list[int]] = asyncio.Queue()
    request.streamer = TokenStream(lambda tokens: loop.call_soon_threadsafe(steps.put_nowait, tokens))
    eos = end_tokens(attached.model, attached.tokenizer)
    stops = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
    hold = max((len(s) for s in stops), default=1) - 1
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason: str | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _event({**identity, "object": kind, "choices": [choice]})

    def visible(tokens: list[int]) -> str:
        tokens = tokens[:request.max_new_tokens[0]]
        end = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
        text = attached.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            return text[:cut]
        return text[:max(len(text) - hold, 0)].rstrip("\ufffd")

    async def events():
        sent = ""
        answer = asyncio.ensure_future(batcher.submit(request))
        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                step = asyncio.ensure_future(steps.get())
                await asyncio.wait({step, answer}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    break
                text = visible(step.result())
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk(text[len(sent):])
                    sent = text
            try:
                final = _apply_stop((await answer)[0], body.stop)
            except Exception as error:  # the status line is sent: report in the stream, as OpenAI does
                status = next((code for kind_, code in STATUS.items() if isinstance(error, kind_)), 400)
                message = str(error) if isinstance(error, UserError) else "internal server error"
                if not isinstance(error, UserError):
                    log.error("streamed request failed", exc_info=error)
                yield _event({"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                        "param": None, "code": status}})
                yield "data: [DONE]\n\n"
                return
            if final["text"].startswith(sent) and len(final["text"]) > len(sent):
                yield chunk(final["text"][len(sent):])
            yield chunk(None, final["finish_reason"])
            if body.stream_options is not None and body.stream_options.include_usage:
                prompt = next(iter(request.rows[0].values()))
                yield _event({**identity, "object": kind, "choices": [], "usage": _usage(attached, [prompt], [final])})
            yield "data: [DONE]\n\n"
        finally:
            if not answer.done():
                answer.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _apply_stop(answer: dict, stop: str | list[str] | None) -> dict:
    """Cut the text at the first stop sequence, as OpenAI's `stop` does."""
    stops = [stop] if isinstance(stop, str) else stop or []
    cuts = [answer["text"].find(s) for s in stops if s and s in answer["text"]]
    if not cuts:
        return answer
    return {**answer, "text": answer["text"][:min(cuts)], "finish_reason": "stop"}


def _usage(attached: AttachedModel, prompts: list[str], answers: list[dict]) -> dict:
    prompt_tokens = sum(len(attached.tokenizer(prompt)["input_ids"]) for prompt in prompts)
    completion_tokens = sum(answer["tokens"] for answer in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _error(status: int, message: str, kind: str, headers: dict | None = None, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` (code: the HTTP status)."""
    content = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(status_code=status, content=content, headers=headers)


class HostCheck:
    """ASGI middleware: a `Host` header outside `allowed` gets 400, so a web page cannot reach this server through a
    DNS name it controls that resolves to loopback (DNS rebinding). `allowed` None accepts any host."""

    def __init__(self, app, allowed: list[str] | None):
        self.app, self.allowed = app, None if allowed is None else {name.lower().strip("[]") for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] if host.count(":") == 1 else host
        if name not in self.allowed:
            message = "Host header not allowed: this server answers to " + ", ".join(sorted(self.allowed)) + " (--allowed-host)"
            return await _error(400, message, "invalid_request_error")(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app reads it.

    The declared Content-Length is checked first; a chunked body is counted as it arrives, then replayed to the app.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        message = f"request body exceeds this server's limit of {self.max_bytes} bytes"
        await _error(413, message, "invalid_request_error")(scope, receive, send)


def serve(attached: AttachedModel, host: str = "127.0.0.1", port: int = 8000, window_ms: float = 5.0,
          max_batch_rows: int = 32, limits: Limits = Limits(), token: str | None = None, adapter_roots: list[str] = (),
          allowed_hosts: list[str] = ()) -> None:
    """Run the app under uvicorn. The Host header may name loopback, `host` itself and `allowed_hosts`; a server bound
    to every interface (0.0.0.0, ::) without `allowed_hosts` accepts any Host."""
    import uvicorn

    if token is None and host not in LOOPBACK_NAMES:
        log.warning("serving on %s without a token: anyone who can reach it can use it (--token)", host)
    names = None if host in ANY_INTERFACE and not allowed_hosts else [*LOOPBACK_NAMES, host, *allowed_hosts]
    app = build_app(attached, window_ms, max_batch_rows, limits, token, adapter_roots, names)
    uvicorn.run(app, host=host, port=port, log_level="info")
