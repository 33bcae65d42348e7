"""One base model in memory, many named adapters: attach, switch, hot-swap, unload, and mixed-adapter batches.

The base is loaded once, with the head of the first adapter's task and, by default, quantized as that adapter's
base was in training (a QLoRA adapter learned to correct the 4-bit weights); every later adapter must be of the
same task (and head shape). peft does the work (`load_adapter`, `delete_adapter`, per-row `adapter_names`);
this class keeps the adapters' task info, checks bases and inputs, and serialises access with a lock.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
from dataclasses import replace

import torch
from peft import LoraConfig, PeftConfig, PeftModel

from peftkit.deploy.adapter_folder import AdapterSource, check_base, find_adapter
from peftkit.errors import UserError, first_line
from peftkit.models.build import build_model, position_limit
from peftkit.models.load import context_length, load_config, load_tokenizer, model_location
from peftkit.recipe.schema import GenerationSection, ModelSection, QuantizationSection
from peftkit.tasks import get_task
from peftkit.tasks.generation import Decoding

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch

log = logging.getLogger("peftkit")


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

        The new weights load under a fresh (staging) peft name; any failure removes whatever the load injected, so a
        failed load or swap leaves the model as it was.
        """
        check_adapter_name(name)
        source = find_adapter(name, reference)
        check_base(source, self.base, self.location, self.config)
        task = get_task(source.task)
        if source.base is None and not source.info and hasattr(task, "info_from_config"):
            source = replace(source, info=task.info_from_config(self.config))
        with self._lock:
            if self.task_type is not None and source.task != self.task_type:
                raise UserError(
                    f"adapter {name!r} is a {source.task} adapter but this base serves {self.task_type}; "
                    f"load it onto its own base instance"
                )
            if self.quantization is not None and not self.full_precision_base and source.quantization != self.quantization:
                log.warning(
                    "adapter %r was trained on a base quantized as %s, but this base is loaded as %s; its outputs "
                    "will differ from training", name, _describe(source.quantization), _describe(self.quantization),
                )
            self._loads += 1
            peft_name = f"adapter_{self._loads}"
            try:
                if self.model is None:
                    self._load_base(source, peft_name)
                else:
                    self.model.load_adapter(str(source.path), adapter_name=peft_name, is_trainable=False)
            except Exception as exc:
                self._drop_staged(peft_name)
                if isinstance(exc, (RuntimeError, ValueError, KeyError)):  # shapes or modules that do not match
                    raise UserError(f"adapter {name!r} (`{reference}`) does not fit the base: {first_line(exc)}") from None
                raise UserError(  # e.g. unreadable weights: the folder is broken, not the server
                    f"adapter {name!r} (`{reference}`) could not be loaded ({type(exc).__name__}); "
                    "check that the folder holds complete peft adapter weights"
                ) from None
            replaced = self._peft_names.get(name)
            if replaced is not None and replaced == self.model.active_adapter:
                self.model.set_adapter(peft_name)
            self.adapters[name], self._peft_names[name] = source, peft_name
            if replaced is not None:
                self.model.delete_adapter(replaced)
            self.model.eval()
            return source

    def _drop_staged(self, peft_name: str) -> None:
        """Remove every trace of a failed load: its peft config, injected layers and wrapped head copies."""
        if self.model is not None and peft_name in self.model.peft_config:
            self.model.delete_adapter(peft_name)
        gc.collect()

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
        limit = None if self.task.WINDOWS_LONG_INPUTS else position_limit(self.model) or context_length(self.config)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"input {i}: expected an object with fields {sorted(fields)}")
            missing = [
                field for field, required in fields.items()
                if not isinstance(row.get(field), str) and (required or row.get(field) is not None)
            ]
            if missing:
                raise UserError(
                    f"input {i}: field(s) {missing} must be strings ({self.task_type} inputs: "
                    f"{', '.join(f'{f} (optional)' if not r else f for f, r in fields.items())})"
                )
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

    def predict(
        self, rows: list[dict], adapters: str | list[str] | None = None, max_new_tokens: int | list[int] | None = None,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, streamer=None,
    ) -> list[dict]:
        """Task answers for `rows`; `adapters` is None (active), a name, or one name per row (mixed batch).

        Generating tasks decode as each adapter's run was evaluated (the `generation` of its record: beams, length
        penalty, and `max_new_tokens` unless given) unless `temperature` > 0 asks for sampling.
        """
        with self._lock:
            names = self.resolve(len(rows), adapters)
            limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(rows)
            answers: list[dict | None] = [None] * len(rows)
            for group, decoding in self._groups(names):
                group_names = [names[i] for i in group]
                options = {}
                if self.task.GENERATES:
                    run_limit = self.generation(group_names[0]).max_new_tokens
                    options = {
                        "max_new_tokens": [limits[i] or run_limit for i in group],
                        "decoding": decoding.sampled(temperature, top_p, seed), "streamer": streamer,
                    }
                with self._serving(group_names) as adapter_names:
                    results = self.task.infer(
                        self.model, self.tokenizer, [rows[i] for i in group], self._infos(group_names), adapter_names, **options
                    )
                for i, answer in zip(group, results):
                    answers[i] = answer
            return answers

    def logits(self, rows: list[dict], adapters: str | list[str] | None = None) -> list[torch.Tensor]:
        with self._lock:
            names = self.resolve(len(rows), adapters)
            logits: list[torch.Tensor | None] = [None] * len(rows)
            for group, _ in self._groups(names):
                group_names = [names[i] for i in group]
                with self._serving(group_names) as adapter_names:
                    results = self.task.forward_logits(
                        self.model, self.tokenizer, [rows[i] for i in group], adapter_names, self._infos(group_names)
                    )
                for i, row_logits in zip(group, results):
                    logits[i] = row_logits
            return logits

    def _groups(self, names: list[str]) -> list[tuple[list[int], Decoding]]:
        """Row indices that can share one forward pass, with their decoding settings.

        peft mixes plain LoRA adapters (and `__base__`) in one batch through per-row `adapter_names`; it cannot mix
        others (DoRA, IA3, prompt learning, ...), so their rows run as a batch of their own with the adapter active.
        Rows of adapters whose runs decoded differently (beams, length penalty) run apart as well.
        """
        groups: dict[tuple, list[int]] = {}
        for i, name in enumerate(names):
            mixing = "mixed" if self._mixable(name) else name
            decoding = Decoding.from_settings(self.generation(name))
            groups.setdefault((mixing, decoding), []).append(i)
        return [(rows, decoding) for (_, decoding), rows in groups.items()]

    def generation(self, name: str) -> GenerationSection:
        """How the run of adapter `name` (`__base__`: the active one) decoded at evaluation."""
        return self.adapters[self._decoding_adapter(name)].generation

    def _decoding_adapter(self, name: str) -> str:
        return name if name != BASE_ADAPTER else self.active

    def _mixable(self, name: str) -> bool:
        if name == BASE_ADAPTER:
            return True
        config = self.model.peft_config[self._peft_names[name]]
        return type(config) is LoraConfig and not config.use_dora and not getattr(config, "alora_invocation_tokens", None)

    @contextlib.contextmanager
    def _serving(self, names: list[str]):
        """Yield the per-row peft names for one forward over rows of `names` (None: the active adapter serves all).

        A single unmixable adapter is activated for the forward and the previous one restored after it. peft leaves
        its per-row forward hooks in place when a forward raises; they are removed here, so a failed request leaves
        nothing behind for the next one.
        """
        active = self.model.active_adapter
        single = names[0] if len(set(names)) == 1 else None
        try:
            if single is not None and single != BASE_ADAPTER and not self._mixable(single):
                self.model.set_adapter(self._peft_names[single])
                yield None
            elif all(name == self.active for name in names):
                yield None
            else:
                yield [self._peft_names.get(name, BASE_ADAPTER) for name in names]
        except BaseException:
            _remove_peft_forward_hooks(self.model)
            raise
        finally:
            if self.model.active_adapter != active:
                self.model.set_adapter(active)

    def _infos(self, names: list[str]) -> list[dict]:
        """Task info per row; rows without an adapter decode with the active adapter's (its labels, its windows)."""
        return [self.adapters[self._decoding_adapter(name)].info for name in names]


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def check_adapter_name(name: str) -> None:
    """Adapter names appear in URLs, logs and OpenAI `model` fields: letters, digits, `_`, `.`, `-`, at most 64."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name == BASE_ADAPTER:
        raise UserError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-' (not starting with "
            f"'.' or '-'); {BASE_ADAPTER!r} is reserved"
        )


def _remove_peft_forward_hooks(model) -> None:
    """Drop the per-row pre-forward hooks peft registers for one forward (`adapter_names`, `alora_offsets`)."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            function = getattr(hook, "func", None)
            if getattr(function, "__module__", "").startswith("peft.") and function.__name__.endswith("_pre_forward_hook"):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


class UnknownAdapter(UserError):
    """A request named an adapter that is not attached (HTTP 404)."""


class InputTooLong(UserError):
    """An input does not fit the model's context or a server's token limit (HTTP 422)."""


def _describe(quantization: QuantizationSection) -> str:
    return f"{quantization.bits}-bit ({quantization.quant_type})" if quantization.bits else "full precision"


