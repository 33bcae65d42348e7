"""The `peftkit` command line. User errors are caught here, once: message on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from peftkit.errors import Preempted, UserError

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on SIGTERM


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning from one YAML recipe.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate and write a run folder")
    _add_recipe_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--force-resume", action="store_true", help="resume even if the recipe changed since")
    train.set_defaults(handler=_train)

    sweep = commands.add_parser("sweep", help="search recipe keys with optuna; one run folder per trial")
    _add_recipe_arguments(sweep)
    sweep.add_argument("--space", required=True, help="search space YAML: recipe key paths -> ranges or choices")
    sweep.add_argument("--trials", type=int, default=10, help="number of trials (default 10)")
    sweep.set_defaults(handler=_sweep)

    validate = commands.add_parser("validate", help="print the fully resolved recipe")
    _add_recipe_arguments(validate)
    validate.set_defaults(handler=_validate)

    plan = commands.add_parser("plan", help="predict per-GPU training memory; --fit finds recipe changes that fit")
    _add_recipe_arguments(plan)
    plan.add_argument("--gpus", type=int, default=None, help="GPUs to train on (default: the visible ones, or 1)")
    plan.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 24GiB or 80GB (default: the visible GPU's)")
    plan.add_argument("--fit", action="store_true", help="search recipe changes that fit, cheapest slowdown first")
    plan.set_defaults(handler=_plan)

    evaluate = commands.add_parser("eval", help="re-evaluate a finished run on its own or other data")
    evaluate.add_argument("run_dir", help="run folder written by `peftkit train`")
    evaluate.add_argument("--data", help="data file or hub dataset to score (default: the run's own split)")
    evaluate.add_argument("--split", help="the run's split (train, validation, test) or, with --data, the hub split")
    evaluate.set_defaults(handler=_eval)

    predict = commands.add_parser("predict", help="write a finished run's predictions for an input file (JSONL)")
    predict.add_argument("run_dir", help="run folder written by `peftkit train`")
    predict.add_argument("--input", required=True, help="input file (json, jsonl, csv, tsv, parquet) with the task's columns")
    predict.add_argument("--output", required=True, help="JSONL file to write, one prediction a line")
    predict.set_defaults(handler=_predict)
    return parser


def _eval(args: argparse.Namespace) -> None:
    import json

    from peftkit.evaluation.saved_run import evaluate_run

    out, metrics = evaluate_run(args.run_dir, args.data, args.split)
    headline = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    print(json.dumps(headline, indent=2))
    print(f"evaluation folder: {out}")


def _predict(args: argparse.Namespace) -> None:
    from peftkit.evaluation.saved_run import predict_file

    count = predict_file(args.run_dir, args.input, args.output)
    print(f"wrote {count} predictions to {args.output}")


def _train(args: argparse.Namespace) -> None:
    from peftkit.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: a bad recipe fails fast
    from peftkit.training.run import train

    run_dir = train(recipe, resume=args.resume or args.force_resume, force_resume=args.force_resume)
    print(f"run folder: {run_dir}")


def _sweep(args: argparse.Namespace) -> None:
    from pathlib import Path

    from peftkit.sweep import sweep

    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    sweep_dir = sweep(Path(args.recipe), Path(args.space), args.trials, args.overrides)
    print(f"sweep folder: {sweep_dir} (results.md, results.csv, results.png, best_recipe.yaml)")


def _validate(args: argparse.Namespace) -> None:
    from peftkit.recipe.load import load_recipe
    from peftkit.run_folder import recipe_as_yaml

    print(recipe_as_yaml(load_recipe(args.recipe, args.overrides)), end="")


def parse_memory_size(text: str) -> int:
    """`24GiB`, `24G` (binary) or `80GB` (decimal) -> bytes."""
    units = {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text.strip().lower()[len(number):].strip() or "gib"
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise UserError(f"--gpu-memory `{text}` must look like 24GiB, 24G or 80GB") from None


def _plan(args: argparse.Namespace) -> None:
    gpu_memory = parse_memory_size(args.gpu_memory) if args.gpu_memory else None
    import torch

    from peftkit.plan.fit import plan_recipe, search
    from peftkit.plan.memory import format_plan
    from peftkit.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    visible = torch.cuda.device_count()
    gpus = args.gpus or visible or 1
    if gpu_memory is None and visible:
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    if args.fit and gpu_memory is None:
        raise UserError("--fit needs --gpu-memory (no GPU is visible to read it from)")
    plan = plan_recipe(recipe, gpus, gpu_memory)
    print(f"model: {recipe.model.name}")
    print(format_plan(plan))
    if not args.fit:
        return
    if plan.fits:
        print("\nthe recipe fits as written")
        return
    candidates = search(recipe, gpus, gpu_memory)
    if not candidates:
        raise UserError(
            f"no combination of quantization, ZeRO/FSDP, offload, checkpointing and micro-batch fits "
            f"{args.gpu_memory or gpu_memory} per GPU; use more GPUs, a shorter data.max_length or a smaller model"
        )
    print("\nrecipe changes that fit, cheapest expected slowdown first:")
    for candidate in candidates:
        print(f"  x{candidate.slowdown:.2f} step time, {candidate.plan.total / 2**30:.2f} GiB: {candidate.as_overrides()}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[peftkit] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.handler(args)
    except UserError as error:
        print(f"peftkit: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as stop:
        print(f"peftkit: stopped: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
