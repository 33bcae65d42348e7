"""One base model in memory, many named adapters: attach, switch, hot-swap, unload, and mixed-adapter batches.

The base is loaded once, with the head of the first adapter's task and, by default, quantized as that adapter's
base was in training (a QLoRA adapter learned to correct the 4-bit weights); every later adapter must be of the
same task (and head shape). peft does the work (`load_adapter`, `delete_adapter`, per-row `adapter_names`);
this class keeps the adapters' task info, checks bases and inputs, and serialises access with a lock.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
from peft import PeftConfig, PeftModel

from peftkit.deploy.adapter_folder import AdapterSource, check_base, find_adapter
from peftkit.errors import UserError
from peftkit.models.load import context_length, load_config, load_tokenizer, model_location
from peftkit.models.build import build_model
from peftkit.recipe.schema import ModelSection, QuantizationSection
from peftkit.tasks import get_task

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class AttachedModel:
    """A base model with adapters attached by name.

    `predict(rows, adapters)` runs rows through the active adapter, one named adapter, or one adapter per row.
    """

    def __init__(self, base: str, adapters: dict[str, str] | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False, full_precision_base: bool = False):
        self.base = base
        self.full_precision_base = full_precision_base  # True: never quantize, whatever the adapters trained on
        self.quantization: QuantizationSection | None = None  # how the base is loaded (set with the first adapter)
        self._model_section = ModelSection(name=base, dtype=dtype, trust_remote_code=trust_remote_code)
        self.location = model_location(self._model_section)
        self.config = load_config(self._model_section)
        self.tokenizer = load_tokenizer(self._model_section)
        self.adapters: dict[str, AdapterSource] = {}
        self.task_type: str | None = None
        self.model: PeftModel | None = None
        self._peft_names: dict[str, str] = {}  # user name -> peft adapter name (fresh per load, so swaps are atomic)
        self._loads = 0
        self._lock = threading.RLock()
        for name, reference in (adapters or {}).items():
            self.load(name, reference)

    @property
    def task(self):
        return get_task(self.task_type)

    @property
    def active(self) -> str | None:
        return next((name for name, peft_name in self._peft_names.items() if peft_name == self.model.active_adapter), None)

    def load(self, name: str, reference: str) -> AdapterSource:
        """Attach the adapter at `reference` as `name`; an existing `name` is replaced (hot-swap).

        The new weights load under a fresh peft name before the old ones go, so a failed swap changes nothing.
        """
        if name == BASE_ADAPTER or not name:
            raise UserError(f"adapter name {name!r} is reserved or empty; choose another name")
        source = find_adapter(name, reference)
        check_base(source, self.base, self.location, self.config)
        with self._lock:
            if self.task_type is not None and source.task != self.task_type:
                raise UserError(
                    f"adapter {name!r} is a {source.task} adapter but this base serves {self.task_type}; "
                    f"load it onto its own base instance"
                )
            if self.quantization is not None and not self.full_precision_base and source.quantization != self.quantization:
                warnings.warn(
                    f"adapter {name!r} was trained on a base quantized as {_describe(source.quantization)}, but this "
                    f"base is loaded as {_describe(self.quantization)}; its outputs will differ from training",
                    stacklevel=2,
                )
            self._loads += 1
            peft_name = f"adapter_{self._loads}"
            try:
                if self.model is None:
                    self._load_base(source, peft_name)
                else:
                    self.model.load_adapter(str(source.path), adapter_name=peft_name, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as exc:
                if self.model is not None and peft_name in self.model.peft_config:
                    self.model.delete_adapter(peft_name)  # drop whatever the failed load injected
                raise UserError(f"adapter {name!r} (`{reference}`) does not fit the base: {_first_line(exc)}") from None
            replaced = self._peft_names.get(name)
            if replaced is not None and replaced == self.model.active_adapter:
                self.model.set_adapter(peft_name)
            self.adapters[name], self._peft_names[name] = source, peft_name
            if replaced is not None:
                self.model.delete_adapter(replaced)
            self.model.eval()
            return source

    def _load_base(self, source: AdapterSource, peft_name: str) -> None:
        task = get_task(source.task)
        quantization = QuantizationSection() if self.full_precision_base else source.quantization
        # Modules the adapter trains fully (task heads) hold full-precision weights: they must not be quantized.
        full_modules = PeftConfig.from_pretrained(str(source.path)).modules_to_save or []
        base_model = build_model(
            self._model_section, quantization, task.AUTO_CLASS, model_kwargs=task.model_kwargs(source.info),
            keep_unquantized=full_modules, config=self.config,
        )
        self.model = PeftModel.from_pretrained(base_model, str(source.path), adapter_name=peft_name).eval()
        self.task_type, self.quantization = source.task, quantization

    def unload(self, name: str) -> None:
        with self._lock:
            self._require(name)
            if len(self.adapters) == 1:
                raise UserError(f"adapter {name!r} is the last one attached; load another before unloading it")
            was_active = self.active == name
            peft_name = self._peft_names.pop(name)
            del self.adapters[name]
            if was_active:
                self.model.set_adapter(next(iter(self._peft_names.values())))
            self.model.delete_adapter(peft_name)

    def activate(self, name: str) -> None:
        with self._lock:
            self._require(name)
            self.model.set_adapter(self._peft_names[name])

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapter(f"unknown adapter {name!r}; attached: {sorted(self.adapters)}")

    def check_rows(self, rows: list[dict], reserve_tokens: int = 0, max_input_tokens: int | None = None) -> None:
        """Each row has the task's input fields as strings, fits the model's context and has at most
        `max_input_tokens` tokens (a server's limit); raises UserError."""
        if self.task_type is None:
            raise UserError("no adapter is attached; load one first")
        fields = self.task.INPUT_FIELDS
        limit = None if self.task.WINDOWS_LONG_INPUTS else context_length(self.config)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"input {i}: expected an object with fields {sorted(fields)}")
            missing = [field for field, required in fields.items() if required and not isinstance(row.get(field), str)]
            if missing:
                raise UserError(f"input {i}: field(s) {missing} must be strings ({self.task_type} inputs: {sorted(fields)})")
            if limit or max_input_tokens:
                length = sum(len(self.tokenizer(row[field])["input_ids"]) for field in fields if isinstance(row.get(field), str))
                if max_input_tokens and length > max_input_tokens:
                    raise InputTooLong(f"input {i}: {length} tokens exceed this server's limit of {max_input_tokens} per input")
                if limit and length + reserve_tokens > limit:
                    raise InputTooLong(
                        f"input {i}: {length} tokens{f' + {reserve_tokens} to generate' if reserve_tokens else ''} "
                        f"exceed the model's context of {limit}"
                    )

    def resolve(self, count: int, adapters: str | list[str] | None) -> list[str]:
        """One adapter name per row from None (the active adapter), a single name, or a list."""
        names = [adapters or self.active] * count if not isinstance(adapters, list) else adapters
        if len(names) != count:
            raise UserError(f"got {len(names)} adapter names for {count} inputs")
        for name in set(names):
            if name != BASE_ADAPTER:
                self._require(name)
        return names

    def predict(self, rows: list[dict], adapters: str | list[str] | None = None, **generation: Any) -> list[dict]:
        """Task answers for `rows`; `adapters` is None (active), a name, or one name per row (mixed batch)."""
        with self._lock:
            names = self.resolve(len(rows), adapters)
            return self.task.infer(self.model, self.tokenizer, rows, self._infos(names), self._adapter_names(names), **generation)

    def logits(self, rows: list[dict], adapters: str | list[str] | None = None) -> list[torch.Tensor]:
        with self._lock:
            names = self.resolve(len(rows), adapters)
            return self.task.forward_logits(self.model, self.tokenizer, rows, self._adapter_names(names), self._infos(names))

    def _infos(self, names: list[str]) -> list[dict]:
        """Task info per row; rows without an adapter decode with the active adapter's (its labels, its windows)."""
        return [self.adapters[name if name != BASE_ADAPTER else self.active].info for name in names]

    def _adapter_names(self, names: list[str]) -> list[str] | None:
        """peft names per row; None when every row uses the active adapter (the plain forward is faster)."""
        if all(name == self.active for name in names):
            return None
        return [self._peft_names.get(name, BASE_ADAPTER) for name in names]


class UnknownAdapter(UserError):
    """A request named an adapter that is not attached (HTTP 404)."""


class InputTooLong(UserError):
    """An input does not fit the model's context or a server's token limit (HTTP 422)."""


def _describe(quantization: QuantizationSection) -> str:
    return f"{quantization.bits}-bit ({quantization.quant_type})" if quantization.bits else "full precision"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
