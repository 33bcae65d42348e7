"""The `peftkit` command line. User errors are caught here, once: message on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import NoReturn

from peftkit.console import configure as configure_console
from peftkit.errors import Preempted, UserError, out_of_space

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on SIGTERM


def _positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (argparse then exits 2 with the option named)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _output_file(path: str, option: str, reads: dict[str, str]) -> None:
    """An output path must name a file whose folder can exist and that the command does not read (`reads`: option ->
    path): checked before any model is loaded."""
    from pathlib import Path

    target = Path(path)
    for read_option, read_path in reads.items():
        if read_path and target.exists() and Path(read_path).exists() and target.samefile(read_path):
            raise UserError(f"{option} `{path}` is the {read_option} file; writing to it would replace what is read. Give another {option}")
    if target.is_dir():
        raise UserError(f"{option} `{path}` is a folder; give a file path, e.g. {target / 'predictions.jsonl'}")
    blocking = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{option} `{path}`: `{blocking}` is a file, not a folder")


# Data-source keys a recipe can set on `data.<split>` that `eval --data` and `predict --input` take as flags too.
_SOURCE_FLAGS_SKIPPED = ("path", "split")


def _add_data_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags generated from the recipe schema's data source, so that a file is read the way a recipe would."""
    from peftkit.recipe.schema import DataSource

    group = parser.add_argument_group("how to read the data (the keys of a recipe's data source)")
    for name, field in DataSource.model_fields.items():
        if name not in _SOURCE_FLAGS_SKIPPED:
            group.add_argument(f"--{name.replace('_', '-')}", dest=f"source_{name}", metavar="VALUE", help=field.description)


def _source_options(args: argparse.Namespace) -> dict:
    """The data-source flags given, typed like recipe overrides (YAML values, raw text for text keys)."""
    from peftkit.recipe.keys import is_text
    from peftkit.recipe.load import parse_value
    from peftkit.recipe.schema import DataSource

    options = {}
    for key, raw in vars(args).items():
        if key.startswith("source_") and raw is not None:
            name = key.removeprefix("source_")
            flag = f"--{name.replace('_', '-')}={raw}"
            options[name] = raw if is_text(DataSource.model_fields[name]) else parse_value(flag, raw)
    return options


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")


VERBOSE_HELP = "also print what the libraries log (otherwise it goes to the run folder's peftkit.log)"


def _command(commands, name: str, example: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with what it does and ends with an example."""
    command = commands.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Accepted after the command too; SUPPRESS keeps a `peftkit -v COMMAND` from being reset to False.
    command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return command


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("peftkit")
    except PackageNotFoundError:  # run from a source tree without installing
        installed = "unknown (not installed)"
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning from one YAML recipe.",
        epilog="example:\n  peftkit train recipes/quickstart.yaml\n\n`peftkit COMMAND --help` describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peftkit {installed}")
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help=VERBOSE_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = _command(commands, "train", "peftkit train recipes/quickstart.yaml training.num_train_epochs=2 output.dir=runs/try", help="train, evaluate and write a run folder")
    _add_recipe_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--force-resume", action="store_true", help="resume even if the recipe changed since")
    train.set_defaults(handler=_train)

    sweep = _command(commands, "sweep", "peftkit sweep recipes/quickstart.yaml --space recipes/sweep_space_lora.yaml --trials 8", help="search recipe keys with optuna; one run folder per trial")
    _add_recipe_arguments(sweep)
    sweep.add_argument("--space", required=True, help="search space YAML: recipe key paths -> ranges or choices")
    sweep.add_argument("--trials", type=_positive_int, default=10, help="number of trials (default 10)")
    sweep.set_defaults(handler=_sweep)

    validate = _command(commands, "validate", "peftkit validate recipes/quickstart.yaml adapter.method=ia3", help="print the fully resolved recipe")
    _add_recipe_arguments(validate)
    validate.set_defaults(handler=_validate)

    merge = _command(commands, "merge", "peftkit merge runs/quickstart --out merged/quickstart --dtype bf16", help="merge a run's adapter into its base and write a standalone model")
    merge.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `peftkit train`")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    merge.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    merge.add_argument(
        "--onto", choices=["original", "dequantized"],
        help="for adapters trained on a quantized base: merge onto the original full-precision weights or onto the "
        "quantized weights dequantized (default: dequantized, which matches the trained model more closely)",
    )
    merge.add_argument("--samples", type=_positive_int, default=64, help="rows of the run's data used to verify the merge")
    merge.add_argument("--tolerance", type=float, help="largest accepted |merged - attached| logit (default per dtype)")
    merge.add_argument("--force", action="store_true", help="write the model even when verification fails")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    merge.set_defaults(handler=_merge)

    predict = _command(commands, "predict", "peftkit predict runs/quickstart --input reviews.jsonl --output answers.jsonl",
        help="write predictions (JSONL) for an input file: RUN_DIR alone uses the run's task, base and adapter; "
        "--adapter NAME=PATH (repeatable) attaches several adapters to one base",
    )
    predict.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder (its adapter and base)")
    _add_base_and_adapter_arguments(predict)
    predict.add_argument("--input", required=True, help="rows to predict (.jsonl, .json, .csv, .tsv, .parquet)")
    predict.add_argument("--output", required=True, help="JSONL file for the answers")
    predict.add_argument("--adapter-column", help="input column naming each row's adapter (mixed-adapter batches)")
    predict.add_argument("--batch-size", type=_positive_int, default=32, help="rows per forward pass")
    predict.add_argument(
        "--max-new-tokens", type=_positive_int, help="most tokens to generate per row (generative tasks; default: the run's generation.max_new_tokens)"
    )
    _add_data_source_arguments(predict)
    predict.set_defaults(handler=_predict)

    serve = _command(commands, "serve", "peftkit serve --adapter sentiment=runs/quickstart --port 8000", help="serve one base with named adapters over HTTP")
    _add_base_and_adapter_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to collect requests into one batch")
    serve.add_argument("--max-batch-size", type=_positive_int, default=32, help="most rows in one batch")
    serve.add_argument(
        "--token", help="require `Authorization: Bearer TOKEN` on every request (default: $PEFTKIT_SERVE_TOKEN; "
        "prefer the variable, a command line is visible to other users)",
    )
    serve.add_argument(
        "--adapter-root", action="append", default=[], metavar="DIR",
        help="allow POST /v1/adapters to load adapters from inside DIR (repeatable); without it runtime loading is off",
    )
    serve.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="a name clients may send in the Host header besides loopback and --host (repeatable; guards against "
        "DNS rebinding); with --host 0.0.0.0 and none given, any Host is accepted",
    )
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, help="largest request body (413 above)")
    serve.add_argument("--max-input-tokens", type=_positive_int, default=4096, help="most tokens per input (422 above)")
    serve.add_argument("--max-new-tokens", type=_positive_int, default=512, help="most tokens a request may generate (422 above)")
    serve.set_defaults(handler=_serve)

    plan = _command(commands, "plan", "peftkit plan recipes/sft_alpaca.yaml --gpus 2 --gpu-memory 24GiB --fit", help="predict per-GPU training memory; --fit finds recipe changes that fit")
    _add_recipe_arguments(plan)
    plan.add_argument("--gpus", type=_positive_int, default=None, help="GPUs to train on (default: the visible ones, or 1)")
    plan.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 24GiB or 80GB (default: the visible GPU's)")
    plan.add_argument("--fit", action="store_true", help="search recipe changes that fit, cheapest slowdown first")
    plan.set_defaults(handler=_plan)

    push = _command(
        commands, "push", "peftkit push runs/quickstart --repo me/minilm-sentiment-lora",
        help="upload a run's adapter (or a merged model folder) with its model card to the Hugging Face Hub",
    )
    push.add_argument("run_dir", metavar="RUN_OR_FOLDER", help="run folder, or a folder written by `peftkit merge`")
    push.add_argument("--repo", required=True, help="hub repository id, e.g. user/name (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", help="hub token with write access (default: HF_TOKEN or `hf auth login`)")
    push.set_defaults(handler=_push)

    evaluate = _command(commands, "eval", "peftkit eval runs/sst2 --data stsa.binary.dev --format label_text --encoding latin-1", help="re-evaluate a finished run on its own or other data")
    evaluate.add_argument("run_dir", help="run folder written by `peftkit train`")
    evaluate.add_argument("--data", help="data file or hub dataset to score (default: the run's own split)")
    evaluate.add_argument("--split", help="the run's split (train, validation, test) or, with --data, the hub split")
    _add_data_source_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    return parser


def _eval(args: argparse.Namespace) -> None:
    import json

    from peftkit.saved_run import evaluate_run

    out, metrics = evaluate_run(args.run_dir, args.data, args.split, _source_options(args))
    headline = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    print(json.dumps(headline, indent=2))
    print(f"evaluation folder: {out}")


def _push(args: argparse.Namespace) -> None:
    from peftkit.deploy.push import push_folder

    print(f"pushed: {push_folder(args.run_dir, args.repo, args.private, args.token)}")


def _predict_run(args: argparse.Namespace) -> None:
    from peftkit.saved_run import predict_file

    count = predict_file(args.run_dir, args.input, args.output, _source_options(args))
    print(f"wrote {count} predictions to {args.output}")


def _add_base_and_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model (hub id, folder or package:...); default: the adapters' recorded base")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH",
        help="attach the adapter (run folder or adapter folder) at PATH as NAME; repeatable",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype of the base")
    parser.add_argument(
        "--full-precision-base", action="store_true",
        help="load the base unquantized even when the adapters were trained on a 4/8-bit base (default: quantize "
        "it as in training, which reproduces the trained model)",
    )


def _train(args: argparse.Namespace) -> None:
    from peftkit.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: a bad recipe fails fast
    from peftkit.training.run import train

    run_dir = train(recipe, resume=args.resume or args.force_resume, force_resume=args.force_resume)
    from peftkit.run_folder import ADAPTER_DIR, METRICS_FILE, REPORT_FILE

    _print_final_metrics(run_dir / METRICS_FILE)
    print(f"run folder: {run_dir} ({REPORT_FILE}, {METRICS_FILE}, {ADAPTER_DIR}/)")


def _print_final_metrics(path) -> None:
    """The scores the user trained for, one line per evaluated split."""
    import json

    if not path.is_file():  # a non-main process of a multi-process launch
        return
    metrics = json.loads(path.read_text(encoding="utf-8"))
    for split in ("validation", "test"):
        scores = metrics.get(split) or {}
        numbers = [f"{name} {value:.4g}" for name, value in scores.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if numbers:
            print(f"{split}: {', '.join(numbers)}")


def _sweep(args: argparse.Namespace) -> None:
    from pathlib import Path

    from peftkit.sweep import sweep

    sweep_dir = sweep(Path(args.recipe), Path(args.space), args.trials, args.overrides)
    print(f"sweep folder: {sweep_dir} (results.md, results.csv, results.png, best_recipe.yaml)")


def _validate(args: argparse.Namespace) -> None:
    from peftkit.recipe.load import load_recipe
    from peftkit.run_folder import recipe_as_yaml

    print(recipe_as_yaml(load_recipe(args.recipe, args.overrides)), end="")


def _merge(args: argparse.Namespace) -> None:
    from peftkit.deploy.merge import merge_run

    result = merge_run(
        args.run_dir, args.out, dtype=args.dtype, onto=args.onto, max_shard_size=args.max_shard_size,
        samples=args.samples, tolerance=args.tolerance, force=args.force, overwrite=args.overwrite,
    )
    check = result.verification
    print(
        f"verification on {check.rows} samples: max |logit difference| {check.max_abs_diff:.3g} "
        f"(tolerance {result.tolerance:g}), prediction agreement {check.agreement:.2%}"
    )
    if result.vs_trained is not None:
        print(
            f"vs the model as trained (quantized base + adapter): max |logit difference| "
            f"{result.vs_trained.max_abs_diff:.3g}, prediction agreement {result.vs_trained.agreement:.2%}"
        )
    print(f"merged model ({result.dtype}, onto the {result.onto} base weights): {result.out_dir}")


def _attached_model(args: argparse.Namespace, run_dir: str | None = None):
    from peftkit.deploy.adapter_folder import find_adapter
    from peftkit.deploy.attach import AttachedModel

    adapters = dict([("run", run_dir)] if run_dir else [])
    for value in args.adapter:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise UserError(f"--adapter {value!r}: expected NAME=PATH, e.g. --adapter sentiment=runs/sentiment")
        adapters[name] = path
    if not adapters:
        raise UserError("give at least one adapter: RUN_DIR or --adapter NAME=PATH")
    base = args.base
    if base is None:
        first = find_adapter(*next(iter(adapters.items())))
        if first.base is None:
            raise UserError(f"adapter {first.name!r} does not record its base model; pass --base")
        base = first.base["name"]
    return AttachedModel(base, adapters, dtype=args.dtype, full_precision_base=args.full_precision_base)


def _predict(args: argparse.Namespace) -> None:
    _output_file(args.output, "--output", {"--input": args.input})
    if args.run_dir and not (args.adapter or args.base or args.adapter_column):
        return _predict_run(args)  # one finished run: every task type, through its saved recipe
    from peftkit.deploy.predict import predict_file

    attached = _attached_model(args, args.run_dir)
    count = predict_file(
        attached, args.input, args.output, args.adapter_column, args.batch_size, _source_options(args),
        max_new_tokens=args.max_new_tokens,
    )
    print(f"{count} predictions: {args.output}")


def _serve(args: argparse.Namespace) -> None:
    from peftkit.deploy.server import TOKEN_ENV, Limits, serve

    token = args.token or os.environ.get(TOKEN_ENV) or None
    limits = Limits(args.max_body_bytes, args.max_input_tokens, args.max_new_tokens)
    serve(
        _attached_model(args), args.host, args.port, args.batch_window_ms, args.max_batch_size, limits, token,
        args.adapter_root, args.allowed_host,
    )


def parse_memory_size(text: str) -> int:
    """`24GiB`, `24G` (binary) or `80GB` (decimal) -> bytes."""
    units = {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text.strip().lower()[len(number):].strip() or "gib"
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"--gpu-memory `{text}` must look like 24GiB, 24G or 80GB") from None
    if not 0 < size < float("inf"):
        raise UserError(f"--gpu-memory `{text}` must be a size above zero, e.g. 24GiB")
    return int(size)


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


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Like `parse_args`, but `key.path=value` overrides may also follow the options (`RECIPE --gpus 1 a.b=c`):
    argparse stops filling a positional list at the first option, leaving later overrides unrecognized."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late_overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if late_overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late_overrides]
        extra = [item for item in extra if item not in late_overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    configure_console(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.handler(args)
    except UserError as error:
        _end_progress_bars()
        if args.verbose and error.__cause__ is not None:  # what the message summarizes, for a bug report
            traceback.print_exception(error.__cause__, file=sys.stderr)
        print(f"peftkit: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as stop:
        print(f"peftkit: stopped: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as error:
        if not out_of_space(error):
            raise
        print(
            f"peftkit: error: no space left on the device ({str(error).strip().splitlines()[0][:300]}). Free space, "
            "then `peftkit train RECIPE --resume` continues from the last complete checkpoint", file=sys.stderr,
        )
        return EXIT_USER_ERROR
    finally:
        _leave_process_group()
    return 0


def _end_progress_bars() -> None:
    """A bar left open by the step that failed (the Trainer's) would put the error on the end of its line."""
    std = sys.modules.get("tqdm.std")  # loaded by whatever drew a bar; looked up, not imported
    for bar in list(std.tqdm._instances) if std else []:
        bar.close()


def run() -> NoReturn:
    """The `peftkit` console script and `python -m peftkit`: one entry, so that a launcher pointed at either
    (`torchrun -m peftkit`, `torchrun --no-python peftkit`) ends its processes the same way."""
    exit_process(main())


def exit_process(code: int) -> NoReturn:
    """End `python -m peftkit` (what launchers run) with `code`. A process of a multi-process launch flushes its
    output and logs, then skips the interpreter's teardown: its files are written and its process group ended, and
    C++ threads of the distributed stack torn down at exit have still aborted ranks that had finished (exit -6,
    "terminate called without an active exception", under DeepSpeed ZeRO-3 on CPU), which the launcher reports as
    a failed run and a cluster script may requeue."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _leave_process_group() -> None:
    """A launched process tears its process group down while the interpreter is whole: left to exit-time
    destructors, gloo's worker threads can abort a run that finished well ("terminate called without an active
    exception", exit -6; pytorch/pytorch#179291). Looked up, not imported: most commands never load torch."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
