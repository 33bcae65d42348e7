"""The HTTP server on loopback: real requests, mixed-adapter micro-batches, runtime adapter management, 4xx errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from tests.conftest import REPO_ROOT
from peftkit.deploy.attach import AttachedModel
from peftkit.deploy.server import build_app

TEXTS = ["the movie was great", "awful service and sad food", "a lovely place", "boring it was"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def start_server():
    """Start `build_app(...)` under uvicorn in a thread on a free loopback port; yields its base URL."""
    servers = []

    def start(attached: AttachedModel, **options) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(build_app(attached, **options), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


async def _post_together(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def test_classification_server(bert_runs, tiny_bert_dir, start_server):
    attached = AttachedModel(str(tiny_bert_dir), {"sentiment": str(bert_runs["sentiment"])})
    url = start_server(attached, window_ms=300, adapter_roots=[str(bert_runs["quality"].parent)])
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["adapters"] == ["sentiment"] and health["task"] == "classification"

    loaded = httpx.post(f"{url}/v1/adapters", json={"name": "quality", "path": str(bert_runs["quality"])}, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["replaced"] is False
    assert {a["name"] for a in httpx.get(f"{url}/v1/adapters").json()["adapters"]} == {"sentiment", "quality"}

    # concurrent requests for different adapters run as one mixed batch and equal each row run alone
    bodies = [{"adapter": name, "inputs": [{"text": text}]} for name, text in zip(["sentiment", "quality"] * 2, TEXTS)]
    before = httpx.get(f"{url}/health").json()["batching"]
    responses = asyncio.run(_post_together(f"{url}/v1/predict", bodies))
    assert [r.status_code for r in responses] == [200] * 4
    after = httpx.get(f"{url}/health").json()["batching"]
    assert after["mixed_batches"] > before["mixed_batches"] and max(after["requests_per_batch"]) >= 2
    for body, response in zip(bodies, responses):
        alone = attached.predict(body["inputs"], body["adapter"])
        assert response.json()["predictions"] == alone
    labels = {r.json()["predictions"][0]["label"] for r in responses}
    assert labels & {"good", "bad"} and labels & {"positive", "negative"}

    per_row = httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": TEXTS[0], "adapter": "quality"}, {"text": TEXTS[1]}]}).json()
    assert per_row["predictions"][0]["label"] in {"good", "bad"} and per_row["predictions"][1]["label"] in {"positive", "negative"}

    errors = {
        "unknown adapter": (httpx.post(f"{url}/v1/predict", json={"adapter": "nope", "inputs": [{"text": "good"}]}), 404),
        "malformed json": (httpx.post(f"{url}/v1/predict", content=b"{not json", headers={"content-type": "application/json"}), 400),
        "missing field": (httpx.post(f"{url}/v1/predict", json={"inputs": [{"txt": "good"}]}), 400),
        "over-long input": (httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "good " * 500}]}), 422),
        "generation on a classifier": (httpx.post(f"{url}/v1/completions", json={"model": "quality", "prompt": "hi"}), 400),
        "bad adapter path": (httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": "nonexistent"}), 400),
    }
    for case, (response, status) in errors.items():
        assert response.status_code == status, (case, response.text)
        assert response.json()["error"]["message"], case
    assert "unknown adapter 'nope'" in errors["unknown adapter"][0].json()["error"]["message"]

    assert httpx.delete(f"{url}/v1/adapters/quality").status_code == 200
    assert httpx.post(f"{url}/v1/predict", json={"adapter": "quality", "inputs": [{"text": "good"}]}).status_code == 404
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # still serving after all the bad requests


def test_openai_compatible_generation(llama_adapters, tiny_llama_dir, start_server):
    attached = AttachedModel(str(tiny_llama_dir), {name: str(path) for name, path in llama_adapters.items()})
    url = start_server(attached, window_ms=300)
    assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} >= {"poet", "critic"}

    bodies = [{"model": name, "prompt": "the movie was", "max_tokens": n} for name, n in [("poet", 5), ("critic", 3), ("poet", 4)]]
    responses = asyncio.run(_post_together(f"{url}/v1/completions", bodies))
    assert [r.status_code for r in responses] == [200] * 3
    for body, response in zip(bodies, responses):
        choice = response.json()["choices"][0]
        alone = attached.predict([{"prompt": body["prompt"]}], body["model"], max_new_tokens=body["max_tokens"])[0]
        assert choice["text"] == alone["text"] and choice["finish_reason"] == alone["finish_reason"]
        assert response.json()["usage"]["completion_tokens"] == alone["tokens"]
    assert httpx.get(f"{url}/health").json()["batching"]["mixed_batches"] >= 1

    chat = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "critic", "messages": [{"role": "user", "content": "was the food good"}], "max_tokens": 4,
    }, timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    misspelt = httpx.post(f"{url}/v1/chat/completions", json={"model": "critic", "messages": [{"role": "usr", "content": "hi"}]})
    assert misspelt.status_code == 400 and "'system', 'user', 'assistant'" in misspelt.json()["error"]["message"]
    too_long = httpx.post(f"{url}/v1/completions", json={"model": "poet", "prompt": "good " * 100, "max_tokens": 64})
    assert too_long.status_code == 422 and "exceed the model's context" in too_long.json()["error"]["message"]
    over_limit = httpx.post(f"{url}/v1/completions", json={"model": "poet", "prompt": "hi", "max_tokens": 600})
    assert over_limit.status_code == 422 and "limit of 512 generated tokens" in over_limit.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404


@pytest.mark.slow
def test_cli_serve_binds_loopback_and_answers(bert_runs, tiny_bert_dir, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "peftkit", "serve", "--base", str(tiny_bert_dir), "--adapter", f"sentiment={bert_runs['sentiment']}",
         "--port", str(port)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 600
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.5)
        assert health.json()["adapters"] == ["sentiment"]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": [{"text": "great"}]}).json()
        assert answer["predictions"][0]["label"] in {"positive", "negative"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_qa_server_answers_spans(qa_adapters, tiny_bert_dir, start_server):
    attached = AttachedModel(str(tiny_bert_dir), {name: str(path) for name, path in qa_adapters.items()})
    url = start_server(attached, window_ms=200)
    context = "the movie was good and 7 lovely people " * 6  # longer than one 32-token window
    bodies = [{"adapter": name, "inputs": [{"question": "which number", "context": context}]} for name in ("first", "second")]
    responses = asyncio.run(_post_together(f"{url}/v1/predict", bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        answer = response.json()["predictions"][0]
        assert set(answer) == {"answer", "start", "end", "score"} and context[answer["start"]:answer["end"]] == answer["answer"]
        alone = attached.predict(body["inputs"], body["adapter"])[0]
        assert answer == {**alone, "score": pytest.approx(alone["score"], abs=1e-4)}
    # a question too long for any window, batched together with a good request, fails alone
    bad = {"adapter": "first", "inputs": [{"question": "which number " * 40, "context": context}]}
    bad_response, good_response = asyncio.run(_post_together(f"{url}/v1/predict", [bad, bodies[0]]))
    assert bad_response.status_code == 400 and "question" in bad_response.json()["error"]["message"]
    good, earlier = good_response.json()["predictions"][0], responses[0].json()["predictions"][0]
    assert good == {**earlier, "score": pytest.approx(earlier["score"], abs=1e-4)}
    missing = httpx.post(f"{url}/v1/predict", json={"inputs": [{"question": "which number"}]})
    assert missing.status_code == 400 and "context" in missing.json()["error"]["message"]


def test_token_limits_and_adapter_roots(bert_runs, tiny_bert_dir, tmp_path, start_server):
    from peftkit.deploy.server import Limits

    root = tmp_path / "allowed"
    root.mkdir()
    shutil.copytree(bert_runs["quality"], root / "quality")
    (root / "escape").symlink_to(bert_runs["sentiment"])  # inside the root by name, outside once resolved
    attached = AttachedModel(str(tiny_bert_dir), {"sentiment": str(bert_runs["sentiment"])})
    url = start_server(attached, token="s3cret", limits=Limits(body_bytes=2000, input_tokens=8), adapter_roots=[str(root)])
    auth = {"Authorization": "Bearer s3cret"}
    good = {"inputs": [{"text": "a lovely place"}]}

    def post(path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{url}{path}", timeout=60, **kwargs)

    cases = {
        "no token": (post("/v1/predict", json=good), 401),
        "wrong token": (post("/v1/predict", json=good, headers={"Authorization": "Bearer s3creT"}), 401),
        "health without token": (httpx.get(f"{url}/health"), 401),
        "body too large": (post("/v1/predict", json={"inputs": [{"text": "good " * 500}]}, headers=auth), 413),
        "chunked body too large": (post("/v1/predict", content=iter([b'{"inputs": [', b" " * 3000, b"]}"]),
                                        headers={**auth, "content-type": "application/json"}), 413),
        "too many input tokens": (post("/v1/predict", json={"inputs": [{"text": "good " * 9}]}, headers=auth), 422),
        "parent traversal": (post("/v1/adapters", json={"name": "x", "path": "../" + bert_runs["quality"].parent.name + "/quality"}, headers=auth), 403),
        "absolute outside": (post("/v1/adapters", json={"name": "x", "path": str(bert_runs["quality"])}, headers=auth), 403),
        "symlink escaping": (post("/v1/adapters", json={"name": "x", "path": "escape"}, headers=auth), 403),
    }
    for case, (response, status) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert response.json()["error"]["code"] == status and response.json()["error"]["message"], case
    assert cases["no token"][0].headers["www-authenticate"] == "Bearer"
    assert "limit of 8 per input" in cases["too many input tokens"][0].json()["error"]["message"]
    assert "x" not in attached.adapters

    loaded = post("/v1/adapters", json={"name": "quality", "path": "quality"}, headers=auth)  # relative to the root
    assert loaded.status_code == 200, loaded.text
    assert attached.adapters["quality"].path == (root / "quality" / "adapter").resolve()
    answer = post("/v1/predict", json={**good, "adapter": "quality"}, headers=auth)  # still serving after the refusals
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in {"good", "bad"}


def test_runtime_loading_is_off_without_adapter_roots(bert_runs, tiny_bert_dir, start_server):
    url = start_server(AttachedModel(str(tiny_bert_dir), {"sentiment": str(bert_runs["sentiment"])}))
    refused = httpx.post(f"{url}/v1/adapters", json={"name": "quality", "path": str(bert_runs["quality"])})
    assert refused.status_code == 403 and "--adapter-root" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["adapters"] == ["sentiment"]


def test_openai_client_streams_and_honours_the_fields_it_sends(llama_adapters, dora_adapter, tiny_llama_dir, start_server):
    """The official `openai` client against a loopback server: streaming, max_completion_tokens, parts, n, stop, seed."""
    import openai

    attached = AttachedModel(str(tiny_llama_dir), {**{n: str(p) for n, p in llama_adapters.items()}, "dora": str(dora_adapter)})
    url = start_server(attached, window_ms=20)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    whole = client.completions.create(model="poet", prompt="the movie was", max_tokens=6)
    chunks = list(client.completions.create(model="poet", prompt="the movie was", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) >= 2  # token by token, not one block
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    four = client.completions.create(model="critic", prompt="the movie was", max_tokens=16, extra_body={"max_completion_tokens": 4})
    assert four.usage.completion_tokens == attached.predict([{"prompt": "the movie was"}], "critic", max_new_tokens=4)[0]["tokens"] <= 4

    messages = [{"role": "user", "content": [{"type": "text", "text": "was the food "}, {"type": "text", "text": "good"}]}]
    chat = client.chat.completions.create(model="dora", messages=messages, max_completion_tokens=5)
    plain = client.chat.completions.create(model="dora", messages=[{"role": "user", "content": "was the food good"}], max_completion_tokens=5)
    assert chat.choices[0].message.content == plain.choices[0].message.content
    streamed = client.chat.completions.create(model="dora", messages=messages, max_completion_tokens=5, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content

    sampled = [client.completions.create(model="poet", prompt="it was", max_tokens=8, n=3, temperature=1.5, seed=5) for _ in range(2)]
    assert len(sampled[0].choices) == 3 and [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    cut = whole.choices[0].text.split(" ")[1]
    stopped = client.completions.create(model="poet", prompt="the movie was", max_tokens=6, stop=[cut])
    assert stopped.choices[0].text == whole.choices[0].text[:whole.choices[0].text.find(cut)] and stopped.choices[0].finish_reason == "stop"
    streamed_stop = client.completions.create(model="poet", prompt="the movie was", max_tokens=6, stop=[cut], stream=True)
    assert "".join(c.choices[0].text for c in streamed_stop if c.choices) == stopped.choices[0].text

    for refused in ({"logprobs": 2}, {"echo": True}, {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="poet", prompt="hi", max_tokens=2, **refused)
        assert error.value.body["param"] == next(iter(refused)) and "not supported" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}], logprobs=True)

    # a DoRA adapter in a batch with others, then every adapter again: peft cannot mix DoRA, nothing may break
    bodies = [{"model": name, "prompt": "the movie was", "max_tokens": 4} for name in ["dora", "poet", "critic", "__base__"]]
    for _ in range(2):
        responses = asyncio.run(_post_together(f"{url}/v1/completions", bodies))
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        for body, response in zip(bodies, responses):
            alone = attached.predict([{"prompt": body["prompt"]}], body["model"], max_new_tokens=4)[0]
            assert response.json()["choices"][0]["text"] == alone["text"]
    assert httpx.delete(f"{url}/v1/adapters/dora").status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=bodies[1]).status_code == 200


def test_every_error_has_the_documented_shape_and_leaks_nothing(bert_runs, tiny_bert_dir, tmp_path, start_server):
    root = tmp_path / "root"
    broken = root / "broken"
    shutil.copytree(bert_runs["quality"] / "adapter", broken)
    (broken / "adapter_model.safetensors").unlink()
    (broken / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle")
    attached = AttachedModel(str(tiny_bert_dir), {"sentiment": str(bert_runs["sentiment"])})
    url = start_server(attached, adapter_roots=[str(root)])
    deep = b'{"inputs": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}"
    cases = {
        "unknown endpoint": (httpx.get(f"{url}/nope"), 404),
        "wrong method": (httpx.get(f"{url}/v1/predict"), 405),
        "openapi": (httpx.get(f"{url}/openapi.json"), 404),
        "docs": (httpx.get(f"{url}/docs"), 404),
        "non-UTF-8": (httpx.post(f"{url}/v1/predict", content=b'{"inputs": [{"text": "\xff\xfe"}]}',
                                 headers={"content-type": "application/json"}), 400),
        "deep nesting": (httpx.post(f"{url}/v1/predict", content=deep, headers={"content-type": "application/json"}), 400),
        "foreign Host": (httpx.get(f"{url}/health", headers={"Host": "attacker.example"}), 400),
        "row adapter list": (httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "a", "adapter": ["x"]}]}), 400),
        "row adapter object": (httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "a", "adapter": {"x": 1}}]}), 400),
        "text_pair not a string": (httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "a", "text_pair": 3}]}), 400),
        "misspelt row field": (httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "a", "txt_pair": "b"}]}), 400),
        "OpenAI's model field": (httpx.post(f"{url}/v1/predict", json={"model": "nope", "inputs": [{"text": "a"}]}), 400),
        "adapter name with newline": (httpx.post(f"{url}/v1/adapters", json={"name": "a\nb", "path": "broken"}), 400),
        "unreadable weights": (httpx.post(f"{url}/v1/adapters", json={"name": "broken", "path": "broken"}, timeout=60), 400),
    }
    for case, (response, status) in cases.items():
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert error["code"] == status and error["message"] and "type" in error and "param" in error, case
        assert str(tmp_path) not in response.text and "Traceback" not in response.text, case
    assert "attacker.example" not in cases["foreign Host"][0].text and "127.0.0.1" in cases["foreign Host"][0].text
    assert "text_pair (optional)" in cases["text_pair not a string"][0].json()["error"]["message"]
    assert "['txt_pair']" in cases["misspelt row field"][0].json()["error"]["message"]  # was ignored: a prediction without the pair
    assert "`adapter`, not `model`" in cases["OpenAI's model field"][0].json()["error"]["message"]  # was: the active adapter answered
    for _ in range(5):  # failed loads leave nothing behind
        assert httpx.post(f"{url}/v1/adapters", json={"name": "broken", "path": "broken"}, timeout=60).status_code == 400
    assert list(attached.model.peft_config) == ["adapter_1"]

    def explode(*_args, **_kwargs):
        raise RuntimeError(f"secret detail at {tmp_path}/weights.bin")

    real = attached.predict
    attached.predict = explode
    failed = httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "a"}]})
    attached.predict = real
    assert failed.status_code == 500 and "secret" not in failed.text and str(tmp_path) not in failed.text
    assert failed.json()["error"]["message"].startswith("internal server error (reference ")
    assert httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": "a"}]}).status_code == 200


def test_openapi_needs_the_token(bert_runs, tiny_bert_dir, start_server):
    url = start_server(AttachedModel(str(tiny_bert_dir), {"sentiment": str(bert_runs["sentiment"])}), token="t")
    for path in ("/openapi.json", "/docs", "/redoc", "/nope"):
        response = httpx.get(f"{url}{path}")
        assert response.status_code in (401, 404) and "openapi" not in response.text, path
        assert "paths" not in response.text
