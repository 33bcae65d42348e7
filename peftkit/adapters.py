"""Build the peft config from the recipe and inject the adapter: peft does the work, this is the glue."""

from __future__ import annotations

from peft import LoraConfig, PeftConfig, get_peft_model

from peftkit.recipe.schema import Recipe


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
