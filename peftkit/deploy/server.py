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
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from peftkit.deploy.adapter_folder import find_adapter
from peftkit.deploy.attach import BASE_ADAPTER, AttachedModel, InputTooLong, UnknownAdapter
from peftkit.deploy.batching import MicroBatcher, Request
from peftkit.errors import UserError
from peftkit.tasks import causal_lm

MAX_INPUTS_PER_REQUEST = 256
TOKEN_ENV = "PEFTKIT_SERVE_TOKEN"


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


STATUS = {Unauthorized: 401, Forbidden: 403, UnknownAdapter: 404, InputTooLong: 422, OverLimit: 422}


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use


class PredictBody(Body):
    inputs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)
    adapter: str | None = Field(None, description="Adapter for every input; an input's own `adapter` field wins.")
    max_new_tokens: int = Field(causal_lm.DEFAULT_MAX_NEW_TOKENS, gt=0)


class GenerationBody(Body):
    model: str
    max_tokens: int = Field(16, gt=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = None


class CompletionBody(GenerationBody):
    prompt: str | list[str] = Field(min_length=1)


class Message(Body):
    role: str
    content: str


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)


class AdapterBody(Body):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


def build_app(
    attached: AttachedModel, window_ms: float = 5.0, max_batch_rows: int = 32, limits: Limits = Limits(),
    token: str | None = None, adapter_roots: list[str] = (),
) -> FastAPI:
    """The app; `token` (if set) is required as `Authorization: Bearer`, `adapter_roots` (if any) allow runtime loads."""
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

    app = FastAPI(title="peftkit", lifespan=lifespan, dependencies=[Depends(require_token)], docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.body_bytes)
    app.state.batcher = batcher

    @app.exception_handler(UserError)
    async def user_error(_request: HttpRequest, error: UserError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(error, kind)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return _error(status, str(error), "authentication_error" if status == 401 else "invalid_request_error", headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: HttpRequest, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5])
        return _error(400, f"malformed request: {problems}", "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(_request: HttpRequest, error: Exception) -> JSONResponse:
        return _error(500, f"{type(error).__name__}: {error}", "server_error")

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
        replaced = body.name in attached.adapters
        source = await asyncio.to_thread(attached.load, body.name, allowed_adapter_path(body.name, body.path, roots))
        return {"name": body.name, "task": source.task, "replaced": replaced}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        await asyncio.to_thread(attached.unload, name)
        return {"name": name, "unloaded": True}

    @app.post("/v1/predict")
    async def predict(body: PredictBody) -> dict:
        rows = [{k: v for k, v in row.items() if k != "adapter"} for row in body.inputs]
        adapters = attached.resolve(len(rows), [row.get("adapter") or body.adapter or attached.active for row in body.inputs])
        generative = attached.task.GENERATES
        if generative:
            _check_new_tokens(body.max_new_tokens, limits, "max_new_tokens")
        attached.check_rows(rows, reserve_tokens=body.max_new_tokens if generative else 0, max_input_tokens=limits.input_tokens)
        request = Request(rows, adapters, [body.max_new_tokens] * len(rows) if generative else None)
        return {"predictions": await batcher.submit(request)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "peftkit"} for name in [*attached.adapters, BASE_ADAPTER]
        ]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> dict:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        answers = await _generate(attached, batcher, body, prompts, limits)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model,
            "choices": [
                {"index": i, "text": answer["text"], "logprobs": None, "finish_reason": answer["finish_reason"]}
                for i, answer in enumerate(answers)
            ],
            "usage": _usage(attached, prompts, answers),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> dict:
        prompt = causal_lm.prompt_from_messages(attached.tokenizer, [m.model_dump() for m in body.messages])
        answers = await _generate(attached, batcher, body, [prompt], limits)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": answers[0]["text"]},
                "finish_reason": answers[0]["finish_reason"],
            }],
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


async def _generate(
    attached: AttachedModel, batcher: MicroBatcher, body: GenerationBody, prompts: list[str], limits: Limits,
) -> list[dict]:
    if not attached.task.COMPLETES_PROMPTS:
        raise UserError(f"this server serves {attached.task_type} adapters, which do not generate text; use POST /v1/predict")
    if len(prompts) > MAX_INPUTS_PER_REQUEST:
        raise UserError(f"at most {MAX_INPUTS_PER_REQUEST} prompts per request")
    _check_new_tokens(body.max_tokens, limits, "max_tokens")
    rows = [{"prompt": prompt} for prompt in prompts]
    adapters = attached.resolve(len(rows), [body.model] * len(rows))
    attached.check_rows(rows, reserve_tokens=body.max_tokens, max_input_tokens=limits.input_tokens)
    sampling = (("temperature", body.temperature), ("top_p", body.top_p))
    answers = await batcher.submit(Request(rows, adapters, [body.max_tokens] * len(rows), sampling))
    return [_apply_stop(answer, body.stop) for answer in answers]


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


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}}, headers=headers)


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
          max_batch_rows: int = 32, limits: Limits = Limits(), token: str | None = None, adapter_roots: list[str] = ()) -> None:
    import logging

    import uvicorn

    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("peftkit").warning("serving on %s without a token: anyone who can reach it can use it (--token)", host)
    app = build_app(attached, window_ms, max_batch_rows, limits, token, adapter_roots)
    uvicorn.run(app, host=host, port=port, log_level="info")
