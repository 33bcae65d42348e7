"""Feature extraction: the frozen model's pooled embeddings + a logistic regression, the baseline LoRA is compared to.

There are no gradient steps, so this task brings its own `fit` instead of the HF Trainer. Embeddings are cached
in the run folder (`features/`), keyed by model, pooling and the tokenized data, so a rerun with `--resume`
refits the classifier without running the model again. Columns, labels, metrics and the report are
classification's (`peftkit.tasks.labelled_text`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm
from transformers import AutoModel, DataCollatorWithPadding

from peftkit.models.build import build_model
from peftkit.models.load import load_config
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import ADAPTER_DIR, CLASSIFIER_RECORD, CLASSIFIER_WEIGHTS, FEATURES_DIR
from peftkit.tasks.labelled_text import prepare, records_from_probabilities, report, score  # noqa: F401  (shared with classification)
from peftkit.tasks.base import FitResult

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "FEATURE_EXTRACTION"
DEFAULT_METRIC = "f1_macro"  # `labelled_text.score`'s headline, as for classification
EMBEDDING_BATCH = 64

def resolve_pooling(recipe: Recipe) -> str:
    """`auto`: decoder-only models summarize a text in its last token, encoders in the mean over tokens."""
    if recipe.task.pooling != "auto":
        return recipe.task.pooling
    config = load_config(recipe.model)
    decoder_only = any(name.endswith("ForCausalLM") for name in config.architectures or []) and not getattr(
        config, "is_encoder_decoder", False
    )
    return "last" if decoder_only else "mean"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence; works with left or right padding."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=hidden.device).expand_as(mask)
    if pooling == "last":
        index = (positions * attention_mask).argmax(-1)
    else:  # cls: the first real token
        index = torch.where(attention_mask.bool(), positions, mask.shape[1]).argmin(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class EmbeddingCache:
    """Pooled embeddings of tokenized datasets, computed once and kept as `.npy` files in the run folder."""

    def __init__(self, recipe: Recipe, tokenizer, folder: Path):
        self.recipe, self.tokenizer, self.folder = recipe, tokenizer, folder
        self.pooling = resolve_pooling(recipe)
        self.model = None
        self.computed = self.reused = 0

    def _key(self, tokenized) -> str:
        digest = hashlib.sha256()
        model = self.recipe.model
        digest.update(json.dumps([model.name, model.revision, model.dtype, self.pooling]).encode())
        for column in sorted(set(tokenized.column_names) - {"labels"}):
            digest.update(column.encode())
            digest.update(repr(tokenized[column]).encode())
        return digest.hexdigest()[:16]

    def __call__(self, tokenized) -> np.ndarray:
        path = self.folder / f"{self._key(tokenized)}.npy"
        if path.is_file():
            self.reused += 1
            return np.load(path, allow_pickle=False)
        embeddings = self._embed(tokenized)
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npy")
        np.save(temporary, embeddings, allow_pickle=False)
        temporary.replace(path)
        self.computed += 1
        return embeddings

    @torch.no_grad()
    def _embed(self, tokenized) -> np.ndarray:
        if self.model is None:
            self.model = build_model(self.recipe.model, self.recipe.quantization, AutoModel).eval()
            (self.folder / "model.json").parent.mkdir(parents=True, exist_ok=True)
            parameters = sum(p.numel() for p in self.model.parameters())
            (self.folder / "model.json").write_text(json.dumps({"parameters": parameters, "pooling": self.pooling}))
        device = next(self.model.parameters()).device
        # An encoder-decoder's features are its encoder's: the full model would also need decoder inputs.
        encoder = self.model.get_encoder() if self.model.config.is_encoder_decoder else self.model
        collate = DataCollatorWithPadding(self.tokenizer)
        inputs = tokenized.remove_columns([c for c in ("labels",) if c in tokenized.column_names])
        chunks = []
        for start in tqdm(range(0, len(inputs), EMBEDDING_BATCH), desc="embedding", unit="batch"):
            batch = {k: v.to(device) for k, v in collate([inputs[i] for i in range(start, min(start + EMBEDDING_BATCH, len(inputs)))]).items()}
            hidden = encoder(**batch).last_hidden_state
            chunks.append(pool(hidden, batch["attention_mask"], self.pooling).float().cpu().numpy())
        return np.concatenate(chunks)

    def model_parameters(self) -> int:
        return json.loads((self.folder / "model.json").read_text())["parameters"]


class FittedClassifier:
    """What `predict` receives: class probabilities from the saved standardization and linear layer, the same
    arrays after training and when `peftkit eval/predict` reload the run. Label ids follow `info['labels']`."""

    def __init__(self, embeddings: EmbeddingCache, weights: dict[str, np.ndarray], label_count: int):
        self.embeddings, self.weights, self.label_count = embeddings, weights, label_count

    def probabilities(self, tokenized) -> np.ndarray:
        w = self.weights
        standardized = (self.embeddings(tokenized).astype(np.float64) - w["scaler.mean"]) / w["scaler.scale"]
        logits = standardized @ w["linear.weight"].T + w["linear.bias"]
        if logits.shape[1] == 1:  # scikit-learn's binary model keeps one row: the logit of the second class
            seen = np.hstack([1 / (1 + np.exp(logits)), 1 / (1 + np.exp(-logits))])
        else:
            seen = np.exp(logits - logits.max(axis=1, keepdims=True))
            seen /= seen.sum(axis=1, keepdims=True)
        full = np.zeros((seen.shape[0], self.label_count))
        full[:, w["linear.classes"]] = seen  # labels absent from training keep probability 0
        return full


def fit(recipe: Recipe, task, info: dict, tokenized: dict, tokenizer, run_dir: Path, checkpoint, callbacks: list) -> FitResult:
    """Embed the training split (or reuse its cache), fit the classifier, save its weights as safetensors."""
    started = time.perf_counter()
    embeddings = EmbeddingCache(recipe, tokenizer, run_dir / FEATURES_DIR)
    train_features = embeddings(tokenized["train"])
    embedded = time.perf_counter()
    pipeline = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=recipe.task.regularization, max_iter=recipe.task.max_iterations, random_state=recipe.training.seed),
    )
    pipeline.fit(train_features, np.asarray(tokenized["train"]["labels"]))
    finished = time.perf_counter()
    log.info("features: %s training embeddings (%s), classifier fitted in %.1f s",
             "reused" if embeddings.reused else "computed", embeddings.pooling, finished - embedded)

    weights = _save_classifier(pipeline, embeddings.pooling, info, run_dir / ADAPTER_DIR)
    tokenizer.save_pretrained(run_dir / ADAPTER_DIR)  # with the classifier, the folder + base model predict
    classifier_parameters = int(pipeline[-1].coef_.size + pipeline[-1].intercept_.size)
    return FitResult(
        predictor=FittedClassifier(embeddings, weights, len(info["labels"])),
        parameters={"trainable": classifier_parameters, "total": embeddings.model_parameters() + classifier_parameters},
        train_metrics={
            "global_step": 0,
            "train_runtime": finished - started,
            "embedding_seconds": embedded - started,
            "classifier_seconds": finished - embedded,
            "embeddings_reused": bool(embeddings.reused),
        },
        log_history=[],
    )


def _save_classifier(pipeline: Pipeline, pooling: str, info: dict, folder: Path) -> dict[str, np.ndarray]:
    """Weights as safetensors (no pickles): standardization and the linear layer, plus what produced the inputs."""
    scaler, linear = pipeline[0], pipeline[-1]
    arrays = {
        "scaler.mean": scaler.mean_, "scaler.scale": scaler.scale_, "linear.weight": linear.coef_,
        "linear.bias": linear.intercept_,
    }
    # safetensors writes an array's memory as is: a Fortran-ordered coef_ (multi-class lbfgs) must be made C-ordered.
    weights = {name: np.ascontiguousarray(array, dtype=np.float64) for name, array in arrays.items()}
    weights["linear.classes"] = np.ascontiguousarray(linear.classes_, dtype=np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / CLASSIFIER_WEIGHTS))
    (folder / CLASSIFIER_RECORD).write_text(json.dumps({"pooling": pooling, "labels": info["labels"]}, indent=2) + "\n")
    return weights


def load_predictor(recipe: Recipe, info: dict, run_dir: Path, tokenizer) -> FittedClassifier:
    """The saved classifier over the frozen base model, for `peftkit eval/predict` (embeddings cached as in training)."""
    weights = load_file(str(run_dir / ADAPTER_DIR / CLASSIFIER_WEIGHTS))
    return FittedClassifier(EmbeddingCache(recipe, tokenizer, run_dir / FEATURES_DIR), weights, len(info["labels"]))


def predict(predictor: FittedClassifier, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    return records_from_probabilities(predictor.probabilities(tokenized), tokenized, raw, recipe, info)
