"""`peftkit serve`: one base, many adapters, over HTTP (FastAPI + uvicorn).

Endpoints: `GET /health`; `GET/POST /v1/adapters`, `DELETE /v1/adapters/{name}` (runtime load/unload/hot-swap);
`POST /v1/predict` (task answers, any task); OpenAI-compatible `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` for generative bases, where `model` names the adapter. Every request goes through
the micro-batcher, so concurrent requests for different adapters share one mixed-adapter forward pass.
Errors are JSON `{"error": {"message", "type", "code"}}` with a 4xx status; the server keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from peftkit.deploy.attach import BASE_ADAPTER, AttachedModel, InputTooLong, UnknownAdapter
from peftkit.deploy.batching import MicroBatcher, Request
from peftkit.errors import UserError
from peftkit.tasks import causal_lm

MAX_INPUTS_PER_REQUEST = 256
MAX_NEW_TOKENS_LIMIT = 1024


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use


class PredictBody(Body):
    inputs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)
    adapter: str | None = Field(None, description="Adapter for every input; an input's own `adapter` field wins.")
    max_new_tokens: int = Field(causal_lm.DEFAULT_MAX_NEW_TOKENS, gt=0, le=MAX_NEW_TOKENS_LIMIT)


class GenerationBody(Body):
    model: str
    max_tokens: int = Field(16, gt=0, le=MAX_NEW_TOKENS_LIMIT)
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


def build_app(attached: AttachedModel, window_ms: float = 5.0, max_batch_rows: int = 32) -> FastAPI:
    batcher = MicroBatcher(attached, window_ms, max_batch_rows)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="peftkit", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(UserError)
    async def user_error(_request: HttpRequest, error: UserError) -> JSONResponse:
        status = 404 if isinstance(error, UnknownAdapter) else 413 if isinstance(error, InputTooLong) else 400
        return _error(status, str(error), "invalid_request_error")

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
        source = await asyncio.to_thread(attached.load, body.name, body.path)
        return {"name": body.name, "task": source.task, "replaced": replaced}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        await asyncio.to_thread(attached.unload, name)
        return {"name": name, "unloaded": True}

    @app.post("/v1/predict")
    async def predict(body: PredictBody) -> dict:
        rows = [{k: v for k, v in row.items() if k != "adapter"} for row in body.inputs]
        adapters = attached.resolve(len(rows), [row.get("adapter") or body.adapter or attached.active for row in body.inputs])
        generative = attached.task is causal_lm
        attached.check_rows(rows, reserve_tokens=body.max_new_tokens if generative else 0)
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
        answers = await _generate(attached, batcher, body, prompts)
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
        answers = await _generate(attached, batcher, body, [prompt])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": answers[0]["text"]},
                "finish_reason": answers[0]["finish_reason"],
            }],
            "usage": _usage(attached, [prompt], answers),
        }

    return app


async def _generate(attached: AttachedModel, batcher: MicroBatcher, body: GenerationBody, prompts: list[str]) -> list[dict]:
    if attached.task is not causal_lm:
        raise UserError(f"this server serves {attached.task_type} adapters, which do not generate text; use POST /v1/predict")
    if len(prompts) > MAX_INPUTS_PER_REQUEST:
        raise UserError(f"at most {MAX_INPUTS_PER_REQUEST} prompts per request")
    rows = [{"prompt": prompt} for prompt in prompts]
    adapters = attached.resolve(len(rows), [body.model] * len(rows))
    attached.check_rows(rows, reserve_tokens=body.max_tokens)
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


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def serve(attached: AttachedModel, host: str = "127.0.0.1", port: int = 8000, window_ms: float = 5.0, max_batch_rows: int = 32) -> None:
    import uvicorn

    uvicorn.run(build_app(attached, window_ms, max_batch_rows), host=host, port=port, log_level="info")
