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
    return parser


def _train(args: argparse.Namespace) -> None:
    from peftkit.recipe.load import load_recipe
    from peftkit.training.run import train

    recipe = load_recipe(args.recipe, args.overrides)
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
