"""Sharding settings built from the recipe, their cross-checks, and the launch/ files (no processes started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit.run_folder import DEEPSPEED_FILE, FSDP_FILE
from peftkit.training.distributed import (
    build_deepspeed_config,
    build_fsdp_config,
    check_launcher_agrees,
    check_strategy_runs_here,
    launcher_sharding,
    resolve_strategy,
    write_sharding_configs,
)
from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from peftkit.run_folder import check_run_folder
from peftkit.training.checkpoints import UnusableWeightsError, check_saved_weights

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def recipe(**sections):
    base = {
        "model": {"name": "some/model"},
        "data": {"train": {"path": "train.jsonl"}},
        "training": {"batch_size": 4, "gradient_accumulation": 3, "max_grad_norm": 0.5, "eval_strategy": "no",
                     "precision": "fp32"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate_recipe(base)


def _values(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _values(value)
    else:
        yield tree


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_batch_sizes_follow_the_real_world_size(world_size, stage):
    config = build_deepspeed_config(recipe(distributed={"strategy": "deepspeed", "zero_stage": stage}), world_size)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * world_size
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == stage
    assert "auto" not in list(_values(config))
    # Only ZeRO-3 splits parameters, so only it must gather them on save.
    assert config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)


def test_deepspeed_offload_and_precision():
    config = build_deepspeed_config(
        recipe(distributed={"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True},
               training={"precision": "bf16"}),
        2,
    )
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}


def test_only_the_chosen_strategy_gets_a_config(tmp_path):
    ddp, fsdp = recipe(), recipe(distributed={"strategy": "fsdp", "offload_params": True, "offload_optimizer": True})
    assert build_deepspeed_config(ddp, 2) is None and build_fsdp_config(ddp, 2) is None
    assert build_deepspeed_config(fsdp, 2) is None
    config = build_fsdp_config(fsdp, 2)
    assert config["version"] == 2 and config["cpu_offload"] is True
    assert config["state_dict_type"] == "FULL_STATE_DICT"  # adapters are saved as one plain PEFT folder
    write_sharding_configs(tmp_path, fsdp, 2, build_deepspeed_config(fsdp, 2))
    assert (tmp_path / FSDP_FILE).is_file() and not (tmp_path / DEEPSPEED_FILE).exists()


def test_auto_strategy_is_ddp_only_on_several_processes():
    assert resolve_strategy(recipe(), 1) == "single"
    assert resolve_strategy(recipe(), 2) == "ddp"
    assert resolve_strategy(recipe(distributed={"strategy": "deepspeed"}), 1) == "deepspeed"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"distributed": {"offload_params": True}}, "distributed.offload_params needs sharded parameters"),
        ({"distributed": {"strategy": "deepspeed", "zero_stage": 2, "offload_params": True}}, "zero_stage: 3"),
        ({"distributed": {"offload_optimizer": True}}, "offload_optimizer needs distributed.strategy"),
        ({"distributed": {"strategy": "fsdp", "offload_params": True}}, "offload_params and distributed.offload_optimizer"),
        (
            {"distributed": {"strategy": "deepspeed", "zero_stage": 3},
             "quantization": {"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "uint8"}},
            "set quantization.storage_dtype: bfloat16",
        ),
        (
            {"distributed": {"strategy": "fsdp"}, "quantization": {"bits": 4, "compute_dtype": "float16"}},
            "storage_dtype must equal quantization.compute_dtype",
        ),
        ({"distributed": {"strategy": "fsdp"}, "quantization": {"bits": 8}}, "bits: 8 cannot be sharded"),
        (
            {"distributed": {"strategy": "deepspeed", "zero_stage": 2}, "training": {"on_nonfinite": "skip"}},
            "on_nonfinite: skip cannot be honoured under distributed.strategy: deepspeed",
        ),
    ],
)
def test_impossible_sharding_combinations_are_refused(sections, message):
    with pytest.raises(UserError, match=message):
        recipe(**sections)


@pytest.mark.parametrize("world_size", [1, 2])
def test_fsdp_without_a_gpu_is_refused(world_size, monkeypatch):
    """accelerate would run DDP instead (measured: DistributedDataParallel, every rank the full 4-bit base)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="distributed.strategy: fsdp needs GPUs.*zero_stage: 3"):
        check_strategy_runs_here(recipe(distributed={"strategy": "fsdp"}), world_size)
    check_strategy_runs_here(recipe(distributed={"strategy": "deepspeed", "zero_stage": 3}), world_size)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_strategy_runs_here(recipe(distributed={"strategy": "fsdp"}), world_size)


def test_qlora_settings_that_shard():
    recipe(distributed={"strategy": "deepspeed", "zero_stage": 3},
           quantization={"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "bfloat16"})
    # ZeRO-2 keeps whole weights on every rank, so the packed uint8 storage is fine there.
    recipe(distributed={"strategy": "deepspeed", "zero_stage": 2}, quantization={"bits": 4})


DEEPSPEED_ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                   "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
                   "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"}


def test_launcher_that_agrees_passes():
    check_launcher_agrees(recipe(distributed={"strategy": "deepspeed", "zero_stage": 3}), DEEPSPEED_ZERO3, 2)
    check_launcher_agrees(recipe(), {}, 2)


@pytest.mark.parametrize(
    ("sections", "environ", "message"),
    [
        ({}, DEEPSPEED_ZERO3, "asks for deepspeed but the recipe resolves to ddp"),
        ({"distributed": {"strategy": "deepspeed", "zero_stage": 2}}, DEEPSPEED_ZERO3,
         "distributed.zero_stage: the accelerate config sets 3 but the recipe sets 2"),
        ({"distributed": {"strategy": "deepspeed", "zero_stage": 3}},
         {**DEEPSPEED_ZERO3, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "distributed.offload_params"),
        ({"distributed": {"strategy": "deepspeed"}}, {"ACCELERATE_USE_FSDP": "true"}, "asks for fsdp"),
        ({"distributed": {"strategy": "fsdp"}}, {"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"},
         "distributed.fsdp_reshard_after_forward"),
        ({}, {"ACCELERATE_MIXED_PRECISION": "bf16"}, "training.precision: the accelerate config sets mixed_precision bf16"),
    ],
)
def test_launcher_that_contradicts_the_recipe_is_refused(sections, environ, message):
    with pytest.raises(UserError, match=message):
        check_launcher_agrees(recipe(**sections), environ, 2)


# Each launch/ file and the recipe `distributed` section it documents as its pair.
LAUNCH_PAIRS = {
    "single_gpu.yaml": {},
    "multi_gpu.yaml": {},
    "zero1.yaml": {"strategy": "deepspeed", "zero_stage": 1},
    "zero2.yaml": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3.yaml": {"strategy": "deepspeed", "zero_stage": 3},
    "zero3_offload.yaml": {"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    "fsdp.yaml": {"strategy": "fsdp"},
    "fsdp_qlora.yaml": {"strategy": "fsdp"},
    "multi_node.yaml": {"strategy": "deepspeed", "zero_stage": 3},
}


def accelerate_environment(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE` gives each process, computed by accelerate itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        return prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return {}


def test_every_launch_file_has_a_documented_pair():
    assert sorted(path.name for path in LAUNCH.glob("*.yaml")) == sorted(LAUNCH_PAIRS)
    assert (LAUNCH / "slurm.sbatch").is_file()


@pytest.mark.parametrize("name", sorted(LAUNCH_PAIRS))
def test_launch_files_agree_with_their_recipes(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # accelerate validates GPU counts
    environ = accelerate_environment(LAUNCH / name)
    distributed = LAUNCH_PAIRS[name]
    quantization = {"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "bfloat16"} if "qlora" in name else {}
    precision = {"precision": "bf16"} if environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" else {}
    world_size = 1 if name == "single_gpu.yaml" else 2
    check_launcher_agrees(recipe(distributed=distributed, quantization=quantization, training=precision), environ,
                          world_size)
    if distributed:  # the same file with a plain DDP recipe is a contradiction
        with pytest.raises(UserError, match="distributed.strategy"):
            check_launcher_agrees(recipe(training=precision), environ, world_size)
    assert launcher_sharding(environ).get("strategy") == distributed.get("strategy")


def _save(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_saved_weights_check(tmp_path):
    check_saved_weights(_save(tmp_path / "good", {"lora_A": torch.ones(4, 8), "lora_B": torch.zeros(8, 4)}))
    with pytest.raises(UnusableWeightsError, match=r"empty tensors \['lora_B'\]"):
        check_saved_weights(_save(tmp_path / "partition", {"lora_A": torch.ones(4, 8), "lora_B": torch.empty(0)}))
    with pytest.raises(UnusableWeightsError, match="no \\*.safetensors"):
        check_saved_weights(tmp_path / "nothing")


def test_every_process_refuses_an_occupied_run_folder(tmp_path):
    run = recipe(output={"dir": str(tmp_path)})
    (tmp_path / "metrics.json").write_text("{}")
    # A non-main process raises too, instead of waiting at a barrier for a main process that stopped.
    with pytest.raises(UserError, match="already exists"):
        check_run_folder(run, resume=False)


def test_training_arguments_carry_the_generated_settings(tmp_path, monkeypatch):
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from peftkit.training.arguments import build_training_args

    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # restored after the test
    zero3 = recipe(distributed={"strategy": "deepspeed", "zero_stage": 3})
    args = build_training_args(zero3, tmp_path, "loss", world_size=1)
    try:
        assert args.deepspeed == build_deepspeed_config(zero3, 1)
        # Registered before any model is loaded, so from_pretrained partitions weights (zero3 init).
        assert args.hf_deepspeed_config.is_zero3()
    finally:
        unset_hf_deepspeed_config()
    fsdp = recipe(distributed={"strategy": "fsdp"})
    args = build_training_args(fsdp, tmp_path, "loss", world_size=2)
    assert args.fsdp and args.fsdp_plugin_args["fsdp_version"] == 2 and args.deepspeed is None
    assert args.use_cpu is not torch.cuda.is_available()  # gloo FSDP on CPU needs use_cpu
    assert not build_training_args(recipe(), tmp_path, "loss").fsdp
