"""Shared fixtures: tiny models built from configs (no downloads) and a small learnable dataset."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Start-up hooks that tests put on a launched process's PYTHONPATH (tests/worker_hooks/sitecustomize.py).
HOOKS = Path(__file__).parent / "worker_hooks"
# Real data lives beside the project (`../shared/data`); PEFTKIT_SHARED_DATA points elsewhere (e.g. from a worktree).
SHARED_DATA = Path(os.environ.get("PEFTKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared CPU they oversubscribe it (10x slower steps).
os.environ.setdefault("OMP_NUM_THREADS", "1")

POSITIVE_WORDS = ["great", "good", "excellent", "lovely", "superb", "wonderful", "fine", "happy"]
NEGATIVE_WORDS = ["bad", "awful", "poor", "terrible", "boring", "sad", "broken", "ugly"]
FILLER_WORDS = ["the", "a", "movie", "food", "service", "it", "was", "very", "really", "and", "this", "place"]


def _word_level_tokenizer(directory: Path):
    """A real fast tokenizer over a small vocabulary, built offline (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"] + sorted(
        set(POSITIVE_WORDS + NEGATIVE_WORDS + FILLER_WORDS + [str(i) for i in range(20)])
    )
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="<s>", eos_token="</s>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def _tiny_checkpoint(tmp_path_factory, name: str, model_class, config_class, special=("pad",), **fields) -> Path:
    """A random-init model (seed 0) sized by `fields`, with the word-level test tokenizer and its `special` token ids,
    saved as a standard HF model folder."""
    import torch

    directory = tmp_path_factory.mktemp(name)
    tokenizer = _word_level_tokenizer(directory)
    torch.manual_seed(0)
    ids = {f"{token}_token_id": getattr(tokenizer, f"{token}_token_id") for token in special}
    model_class(config_class(vocab_size=len(tokenizer), **ids, **fields)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder saved as a standard HF model folder."""
    from transformers import BertConfig, BertModel

    return _tiny_checkpoint(tmp_path_factory, "tiny-bert", BertModel, BertConfig, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama decoder (causal LM weights; heads are added by each task)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_checkpoint(tmp_path_factory, "tiny-llama", LlamaForCausalLM, LlamaConfig, ("pad", "bos", "eos"),
                            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    """A 2-layer mixture-of-experts decoder (Mixtral: router + fused expert weights, which peft adapts as parameters)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _tiny_checkpoint(tmp_path_factory, "tiny-mixtral", MixtralForCausalLM, MixtralConfig, ("pad", "bos", "eos"),
                            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=128)


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Balanced rows whose label is decided by one sentiment word among fillers: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER_WORDS, 2) + [rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def sentiment_files(tmp_path) -> dict[str, Path]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(160, seed=1)),
        "validation": write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(40, seed=2)),
        "test": write_jsonl(tmp_path / "test.jsonl", sentiment_rows(40, seed=3)),
    }


def classification_recipe(model_dir: Path, files: dict[str, Path], run_dir: Path, **sections) -> dict:
    """A plain-dict recipe for the tiny models; keyword sections are deep-merged over it."""
    from peftkit.recipe.load import deep_merge

    recipe = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "task": {"type": "classification"},
        "data": {name: {"path": str(path)} for name, path in files.items()},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "epochs": 6, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 5, "seed": 7,
            "eval_strategy": "epoch", "save_strategy": "epoch",
        },
        "output": {"dir": str(run_dir), "tensorboard": False},
    }
    if sections.get("adapter", {}).get("method", "lora") != "lora":
        del recipe["adapter"]  # LoRA's options are errors for other methods
    return deep_merge(recipe, sections)


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m peftkit ...` in a fresh process against this checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, cwd=cwd or REPO_ROOT,
        timeout=timeout, env=full_env,
    )


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`peftkit ...` through `peftkit.cli.main` in this process, which `python -m peftkit` only wraps in `sys.exit`:
    the same exit code and messages (an unhandled exception fails the test with its traceback) without paying
    the ~10 s of importing torch/transformers/peft again. Tests keep `run_cli` where the process itself matters."""
    from peftkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def trained_run(tiny_bert_dir, tmp_path_factory):
    """A classification run trained on the sentiment data: (run folder, data files). Tests may add files to it."""
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import train

    data_dir = tmp_path_factory.mktemp("data")
    files = {
        "train": write_jsonl(data_dir / "train.jsonl", sentiment_rows(160, seed=1)),
        "validation": write_jsonl(data_dir / "validation.jsonl", sentiment_rows(40, seed=2)),
        "test": write_jsonl(data_dir / "test.jsonl", sentiment_rows(40, seed=3)),
    }
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    recipe = validate_recipe(classification_recipe(tiny_bert_dir, files, run_dir, output={"tensorboard": True}))
    return train(recipe), files


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A 2+2-layer T5 encoder-decoder whose tokenizer ends every sequence with </s> (so generation can stop)."""
    import torch
    from tokenizers import processors
    from transformers import T5Config, T5ForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = _word_level_tokenizer(directory)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)]
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def number_rows(count: int, seed: int) -> list[dict]:
    """Source: 2-5 sentiment words; target: each word's fixed number (a word-by-word "translation")."""
    rng = random.Random(seed)
    vocabulary = POSITIVE_WORDS + NEGATIVE_WORDS
    rows = []
    for _ in range(count):
        words = rng.sample(vocabulary, rng.randint(2, 5))
        rows.append({"source": " ".join(words), "target": " ".join(str(vocabulary.index(w)) for w in words)})
    return rows


def qa_rows(count: int, seed: int) -> list[dict]:
    """Flat SQuAD-style rows: filler contexts of 6-40 words holding one number, which is the answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = [rng.choice(FILLER_WORDS + POSITIVE_WORDS) for _ in range(rng.randint(6, 40))]
        position = rng.randrange(len(words))
        words.insert(position, str(rng.randrange(20)))
        context = " ".join(words)
        start = len(" ".join(words[:position])) + (1 if position else 0)
        rows.append({
            "id": f"q{seed}-{i}", "question": "which number", "context": context,
            "answers": {"text": [words[position]], "answer_start": [start]},
        })
    return rows


def train_tiny_run(model_dir: Path, directory: Path, seed: int = 7, label_names: tuple[str, str] = ("positive", "negative"),
                   **sections) -> Path:
    """A short LoRA classification run (few steps, no periodic evaluation) for tests that need a run folder."""
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import train

    positive, negative = label_names
    rows = [
        {**row, "label": positive if row["label"] == "positive" else negative} for row in sentiment_rows(96, seed=seed)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    files = {"train": write_jsonl(directory / "train.jsonl", rows[:64]), "test": write_jsonl(directory / "test.jsonl", rows[64:])}
    recipe = classification_recipe(
        model_dir, files, directory / "run",
        training={"max_steps": 12, "eval_strategy": "no", "save_strategy": "no", "seed": seed, "logging_steps": 4},
        evaluation={"splits": ["test"], "worst_examples": 0},
    )
    from peftkit.recipe.load import deep_merge

    return train(validate_recipe(deep_merge(recipe, sections)))


@pytest.fixture(scope="session")
def bert_runs(tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA runs on the tiny BERT with different seeds and label names (`positive/negative`, `good/bad`)."""
    root = tmp_path_factory.mktemp("bert-runs")
    return {
        "sentiment": train_tiny_run(tiny_bert_dir, root / "sentiment", seed=7),
        "quality": train_tiny_run(tiny_bert_dir, root / "quality", seed=11, label_names=("good", "bad")),
    }


def random_llama_adapter(model_dir: Path, directory: Path, seed: int, **lora) -> Path:
    """A causal-LM LoRA adapter (all linear layers) with random, non-zero weights, saved the way peft saves any adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    model = get_peft_model(base, config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.mul_(4.0)  # large enough to change greedy generations
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Two causal-LM LoRA adapters with random (non-zero) weights."""
    root = tmp_path_factory.mktemp("llama-adapters")
    return {name: random_llama_adapter(tiny_llama_dir, root / name, seed) for seed, name in [(1, "poet"), (2, "critic")]}


@pytest.fixture(scope="session")
def dora_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A causal-LM DoRA adapter: peft cannot mix it with others in one batch."""
    return random_llama_adapter(tiny_llama_dir, tmp_path_factory.mktemp("dora") / "dora", 3, use_dora=True)


def train_tiny_qa_run(model_dir: Path, directory: Path, seed: int = 7, **sections) -> Path:
    """A short LoRA extractive-QA run on the tiny BERT: 32-token windows with stride 8, so contexts need several."""
    from peftkit.recipe.load import deep_merge, validate_recipe
    from peftkit.training.run import train

    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "train": write_jsonl(directory / "train.jsonl", qa_rows(48, seed=seed)),
        "test": write_jsonl(directory / "test.jsonl", qa_rows(12, seed=seed + 1)),
    }
    recipe = classification_recipe(
        model_dir, files, directory / "run", data={"max_length": 32},
        training={"max_steps": 12, "eval_strategy": "no", "save_strategy": "no", "seed": seed, "logging_steps": 4},
        evaluation={"splits": ["test"], "worst_examples": 0},
    )
    recipe["task"] = {"type": "extractive_qa", "doc_stride": 8}
    return train(validate_recipe(deep_merge(recipe, sections)))


@pytest.fixture(scope="session")
def qa_adapters(tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    """A trained extractive-QA run (`first`) and a copy of its adapter with perturbed weights (`second`)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("qa-runs")
    run = train_tiny_qa_run(tiny_bert_dir, root / "first")
    second = root / "second"
    shutil.copytree(run / "adapter", second)
    weights = load_file(second / "adapter_model.safetensors")
    torch.manual_seed(3)
    save_file({k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()}, second / "adapter_model.safetensors")
    return {"first": run, "second": second}
