"""Build the peft config from the recipe and inject the adapter: peft does the work, this is the glue."""

from __future__ import annotations

from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import PretrainedConfig

from peftkit.models.fingerprint import architecture, fingerprint
from peftkit.models.load import model_location
from peftkit.recipe.schema import Recipe

ADAPTER_RECORD = "peftkit_adapter.json"


def build_peft_config(recipe: Recipe, task_type: str, head_modules: list[str] = ()) -> PeftConfig | None:
    """None means full fine-tuning. Task heads are trained fully and saved with the adapter."""
    adapter = recipe.adapter
    if adapter.method == "none":
        return None
    modules_to_save = sorted({*(adapter.modules_to_save or []), *head_modules}) or None
    return LoraConfig(
        task_type=task_type,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        bias=adapter.bias,
        modules_to_save=modules_to_save,
    )


def attach_adapter(model, recipe: Recipe, task_type: str, head_modules: list[str] = ()):
    config = build_peft_config(recipe, task_type, head_modules)
    if config is None:
        return model
    return get_peft_model(model, config)


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def adapter_record(recipe: Recipe, base_config: PretrainedConfig, task_info: dict) -> dict:
    """What an adapter folder needs to be deployed on its own: the base it was trained on and its task.

    Written next to the weights as `ADAPTER_RECORD`; attaching checks the base fingerprint against it.
    """
    fields = architecture(base_config)
    return {
        "base": {
            "name": recipe.model.name,
            "location": model_location(recipe.model),
            "revision": recipe.model.revision,
            "architecture": fields,
            "fingerprint": fingerprint(fields),
        },
        "task": {"type": recipe.task.type, **task_info},
        "quantization": recipe.quantization.model_dump(mode="json"),
    }
