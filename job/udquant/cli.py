"""Command line: `udquant-job SOURCE ...` and `udquant <command> ...`.

The only place that prints results, maps errors to exit codes and sets up logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from udquant import __version__
from udquant.arguments import finite_number, whole_number
from udquant.dispatch.base import redact
from udquant.dispatch.cli import add_dispatch_command
from udquant.errors import InputError, UdquantError
from udquant.evaluate import DEFAULT_EVAL_CHUNKS, DEFAULT_EVAL_CONTEXT, MAX_EVAL_CHUNKS
from udquant.job import DEFAULT_IMATRIX_CONTEXT, JobOptions, JobResult, run_job, will_upload
from udquant.measure import EvalSettings
from udquant.out_dir import check_output_file, is_eval_json, is_extracted_recipe, is_udquant_plot
from udquant.recipe import DEFAULT_LEVEL, check_level_name
from udquant.resolve import looks_like_path, validate_repo_id
from udquant.workdir import write_text_atomic

logger = logging.getLogger("udquant")

GIGABYTES = finite_number("a size in GB", at_least=0, scale=1e9)
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN")
HUB_FILE_LIMIT_GB = 50.0  # the Hub refuses larger files, at the commit, after all the work
SPLIT_GIGABYTES = finite_number("a size in GB", above=0, at_most=HUB_FILE_LIMIT_GB, scale=1e9)

# Exit codes of errors are set on the error classes (errors.py) and listed in the README.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_INTERNAL = 70


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, a cancelled HF Job): unwound like Ctrl-C, so that the running tool is
    killed and its partial output removed on the way out, instead of living on as an orphan."""


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    # Not SIG_DFL: as the image's entrypoint the job is PID 1, for which the kernel ignores it.
    os._exit(EXIT_TERMINATED)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, _exit_at_once)  # a second SIGTERM ends the process at once
    raise Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _configure_logging(verbose: bool) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs and CI: one unwrapped line per message
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    # huggingface_hub and others stay at warnings unless asked.
    for name in ("huggingface_hub", "httpx", "httpx2", "httpcore", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def default_work_dir() -> Path:
    return Path(os.environ.get("UDQUANT_WORK_DIR", "udquant-out/.work"))


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Hub repo id (owner/name) or local model directory")
    parser.add_argument("--quant", dest="levels", action="append", metavar="LEVEL",
                        help=f"level to make, repeatable (default: --recipe's level, else {DEFAULT_LEVEL})")
    parser.add_argument("--recipe", default="auto", metavar="auto|ID|PATH",
                        help="auto: the library's recipe for the architecture and each --quant level (default); "
                             "or a library id (qwen35/UD-Q5_K_XL) or a recipe file")
    parser.add_argument("--imatrix", default="auto", metavar="auto|none|compute|PATH",
                        help="importance matrix: auto (the distill's own from the Hub; computed for a local "
                             "folder or on a GPU build), none, compute, or a .gguf/.dat file (default: auto)")
    parser.add_argument("--allow-base-imatrix", action="store_true",
                        help="let auto fall back to the base model's imatrix (labelled as such in the card)")
    parser.add_argument("--out-dir", type=Path, help="where results go (default: ./udquant-out/<name>)")
    parser.add_argument("--work-dir", type=Path, default=default_work_dir(),
                        help="intermediate files, reused on rerun (default: ./udquant-out/.work)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    mtp = parser.add_mutually_exclusive_group()
    mtp.add_argument("--no-mtp", dest="no_mtp", action="store_const", const=True,
                     help="drop MTP layers (default: only when the weights hold none, whatever the config declares)")
    mtp.add_argument("--mtp", dest="no_mtp", action="store_const", const=False, help="keep MTP layers")
    parser.add_argument("--no-mmproj", dest="mmproj", action="store_false",
                        help="publish the text model only, without the vision tower's mmproj file")
    parser.add_argument("--calibration", type=Path, help="calibration text for --imatrix compute")
    parser.add_argument("--imatrix-chunks", type=whole_number("a number of chunks", at_least=1),
                        help="--imatrix compute: at most N chunks of the text (default: all it holds)")
    parser.add_argument("--imatrix-context", type=whole_number("a number of tokens", at_least=32),
                        help=f"--imatrix compute: tokens per chunk (default: {DEFAULT_IMATRIX_CONTEXT})")
    parser.add_argument("--eval", dest="evaluate", action="store_true",
                        help="measure KL divergence vs BF16 for every level and the standard quant (card + result)")
    add_eval_arguments(parser)
    parser.add_argument("--threads", type=whole_number("a number of threads", at_least=1),
                        help="CPU threads of the llama.cpp tools (default: theirs)")
    parser.add_argument("--disk-reserve-gb", type=GIGABYTES, default=1.0,
                        help="disk space to leave free after the job (default: 1)")
    upload = parser.add_mutually_exclusive_group()
    upload.add_argument("--upload", dest="upload", action="store_const", const=True,
                        help="upload to the Hub (default: when the source is a Hub repo and HF_TOKEN is set)")
    upload.add_argument("--no-upload", dest="upload", action="store_const", const=False,
                        help="keep results local")
    parser.add_argument("--output-repo", help="Hub repo for the results (default: <you>/<Name>-UD-GGUF)")
    parser.add_argument("--private", action="store_true", help="create the output repo private")
    parser.add_argument("--split-size-gb", type=SPLIT_GIGABYTES, default=45.0,
                        help="split GGUF files larger than this before upload (default: 45; at most the Hub's 50)")
    parser.add_argument("-v", "--verbose", action="store_true")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-text", type=Path, metavar="FILE",
                        help="text to measure on (default: the bundled held-out English text)")
    parser.add_argument("--eval-chunks", type=int,
                        help=f"chunks of the eval text (default {DEFAULT_EVAL_CHUNKS}, at most {MAX_EVAL_CHUNKS})")
    parser.add_argument("--eval-context", type=int,
                        help=f"tokens per chunk (default {DEFAULT_EVAL_CONTEXT})")


def eval_settings_from_args(args: argparse.Namespace) -> EvalSettings:
    settings = EvalSettings(args.eval_text, DEFAULT_EVAL_CHUNKS if args.eval_chunks is None else args.eval_chunks,
                            DEFAULT_EVAL_CONTEXT if args.eval_context is None else args.eval_context)
    settings.check()
    return settings


def _eval_options_without_eval(args: argparse.Namespace) -> list[str]:
    given = [("--eval-text", args.eval_text is not None), ("--eval-chunks", args.eval_chunks is not None),
             ("--eval-context", args.eval_context is not None)]
    return [name for name, present in given if present]


def _imatrix_options_without_computing(args: argparse.Namespace) -> list[str]:
    given = [("--calibration", args.calibration is not None), ("--imatrix-chunks", args.imatrix_chunks is not None),
             ("--imatrix-context", args.imatrix_context is not None)]
    return [name for name, present in given if present]


def _levels_given(levels: list[str] | None) -> tuple[str, ...] | None:
    """The --quant levels, None when not given (--recipe's own level then, else the default)."""
    if not levels:
        return None
    for level in levels:
        check_level_name(level, "--quant")
    if twice := sorted({level for level in levels if levels.count(level) > 1}):
        raise InputError(f"--quant {', '.join(twice)} is given more than once")
    return tuple(levels)


def _check_publishing(args: argparse.Namespace, token: str | None) -> None:
    local = looks_like_path(args.source)
    if args.revision is not None and local:
        raise InputError(f"--revision applies to a Hub repo, not to the local folder {args.source}",
                         hint="leave out --revision, or check out that revision into the folder")
    if args.output_repo is not None:
        validate_repo_id(args.output_repo, "--output-repo")
    if args.private and not will_upload(args.upload, from_hub=not local, token=token):
        if args.upload is False:
            hint = "leave out --no-upload or --private"
        elif local:
            hint = "add --upload (with HF_TOKEN set), or leave out --private"
        else:
            hint = "set HF_TOKEN (a Hub repo is then uploaded by default), or leave out --private"
        raise InputError("--private only applies with --upload: it makes the output repo private", hint=hint)


def options_from_args(args: argparse.Namespace) -> JobOptions:
    if not args.evaluate and (stray := _eval_options_without_eval(args)):
        raise InputError(f"{', '.join(stray)} only {'applies' if len(stray) == 1 else 'apply'} with --eval",
                         hint="add --eval, or leave them out")
    # auto computes one for a local folder (and on a GPU when the Hub has none): the options apply there.
    if args.imatrix not in ("auto", "compute") and (stray := _imatrix_options_without_computing(args)):
        raise InputError(f"{', '.join(stray)} only {'applies' if len(stray) == 1 else 'apply'} when the imatrix "
                         f"is computed, not with --imatrix {args.imatrix}",
                         hint="use --imatrix compute, or leave them out")
    if args.calibration is not None:
        if not args.calibration.is_file():
            raise InputError(f"--calibration {args.calibration}: no such file")
        if args.calibration.stat().st_size == 0:
            raise InputError(f"--calibration {args.calibration}: the file is empty",
                             hint="give a text of a few thousand tokens or more")
    token = os.environ.get("HF_TOKEN") or None
    _check_publishing(args, token)
    return JobOptions(
        source=args.source, levels=_levels_given(args.levels), recipe=args.recipe,
        imatrix=args.imatrix, out_dir=args.out_dir, work_dir=args.work_dir, revision=args.revision,
        no_mtp=args.no_mtp, mmproj=args.mmproj, calibration=args.calibration, imatrix_chunks=args.imatrix_chunks,
        imatrix_context=args.imatrix_context or DEFAULT_IMATRIX_CONTEXT, threads=args.threads,  # >= 32 if given
        disk_reserve=int(args.disk_reserve_gb * 1e9), allow_base_imatrix=args.allow_base_imatrix,
        upload=args.upload, output_repo=args.output_repo, private=args.private,
        split_bytes=int(args.split_size_gb * 1e9), evaluate=args.evaluate,
        eval_settings=eval_settings_from_args(args) if args.evaluate else EvalSettings(),
        token=token)


def _note(text: str) -> None:
    """A line for the person at the terminal (stderr), never wrapped."""
    print(text, file=sys.stderr)


def print_report(result: JobResult) -> None:
    console = Console(stderr=True, soft_wrap=True)
    table = Table(title="stage timings", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("")
    for name, entry in result.timings.items():
        table.add_row(name, f"{entry['seconds']:.1f}", "reused" if entry["cached"] else "")
    console.print(table)
    for level in result.levels:
        check = level.verification
        _note(f"{level.level}: {check.summary} ({check.bits_per_weight:.2f} BPW) -> verified")


def _run(action: str, func: object, args: argparse.Namespace) -> int:
    try:
        with _sigterm_as_interrupt():
            return int(func(args))  # type: ignore[operator]
    except UdquantError as err:  # a service's answer may echo what it was sent: never a token
        logger.error("%s failed: %s", action, redact(str(err), _known_secrets()))
        return err.exit_code
    except KeyboardInterrupt as interrupt:
        what = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        logger.error("%s; rerun the same command to continue where it stopped", what)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get("UDQUANT_DEBUG"):
            raise
        # The traceback quotes the exception, which may quote a request or an answer: redacted like error lines.
        trace = "".join(traceback.format_exception(err)).rstrip()
        logger.error("internal error: a bug in udquant; please report it with the traceback below\n%s",
                     redact(trace, _known_secrets()))
        return EXIT_INTERNAL


def _known_secrets() -> list[str | None]:
    """The tokens an error could echo: read from the environment and the stored token file only (get_token may
    ask the network, and may fail, while an error is being reported)."""
    from huggingface_hub import constants

    try:
        stored = Path(constants.HF_TOKEN_PATH).read_text().strip()
    except (OSError, ValueError):
        stored = None
    return [stored, *(os.environ.get(name) for name in SECRET_ENVS)]


def _job(args: argparse.Namespace) -> int:
    result = run_job(options_from_args(args))
    print_report(result)
    if result.publication is not None:
        state = "uploaded in one commit" if result.publication.commit else "already up to date, nothing uploaded"
        _note(f"{result.publication.repo_id}: {state}")
        print(result.publication.url)
    else:
        print(result.out_dir.resolve())
    return 0


# The tiny model's 512-token context and the bundled eval text hold 4 chunks of 256 comfortably.
DEMO_EVAL = EvalSettings(chunks=4, context=256)


def _demo(args: argparse.Namespace) -> int:
    """Make the bundled tiny model and run the whole job on it, offline."""
    from udquant.tiny_model import make_tiny_model

    model_dir = make_tiny_model(args.work_dir / "demo-model" / "udquant-tiny-llama")
    options = JobOptions(source=str(model_dir), imatrix="compute", imatrix_chunks=16, imatrix_context=128,
                         out_dir=args.out_dir, work_dir=args.work_dir, disk_reserve=100_000_000, upload=False,
                         evaluate=args.evaluate, eval_settings=DEMO_EVAL)
    result = run_job(options)
    print_report(result)
    print(result.out_dir.resolve())
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Measure GGUF files against their BF16 model; print the card's table."""
    import json

    from udquant.evaluate import render_eval_table
    from udquant.measure import compare_files, require_plotting
    from udquant.toolchain import find_toolchain

    settings = eval_settings_from_args(args)
    json_path = check_output_file(args.json, "--json", "udquant eval's JSON", is_eval_json) if args.json else None
    plot_path = check_output_file(args.plot, "--plot", "a plot udquant drew", is_udquant_plot) if args.plot else None
    if plot_path:
        require_plotting()
    rows = compare_files(find_toolchain(), args.base, args.quants, settings, args.work_dir)
    print(render_eval_table(rows))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_path, json.dumps({"base": args.base.name, "eval_text": settings.describe(),
                                                 "eval": [row.describe() for row in rows]}, indent=2) + "\n")
        _note(f"wrote {args.json}")
    if plot_path:
        from udquant.plot import plot_kld_vs_bpw

        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_kld_vs_bpw(rows, plot_path, title=f"KL divergence vs size, against {args.base.name}")
        _note(f"wrote {args.plot}")
    return 0


def _add_eval_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    evaluate = commands.add_parser(
        "eval", help="KL divergence of GGUF files of one model against its BF16 GGUF",
        description="Measure any GGUF quants of one model (udquant's, Unsloth's, standard ones) against its "
                    "BF16 GGUF with llama-perplexity, on the same text: mean/99% KLD, same top token, PPL ratio.")
    evaluate.add_argument("base", type=Path, help="the model's BF16 (or F16/F32) GGUF")
    evaluate.add_argument("quants", type=Path, nargs="+", help="GGUF files to measure")
    add_eval_arguments(evaluate)
    evaluate.add_argument("--work-dir", type=Path, default=default_work_dir(),
                          help="base logits and results, reused on rerun (default: ./udquant-out/.work)")
    evaluate.add_argument("--json", type=Path,
                          help="also write the numbers as JSON here (replaces only an earlier one, or an empty file)")
    evaluate.add_argument("--plot", type=Path, help="also plot KLD against bits per weight (PNG) here (replaces "
                                                    "only a plot udquant or matplotlib drew)")
    evaluate.add_argument("-v", "--verbose", action="store_true")
    evaluate.set_defaults(func=_eval)


def _toolchain(args: argparse.Namespace) -> int:
    from udquant.toolchain import find_toolchain

    toolchain = find_toolchain()
    for key, value in toolchain.describe().items():
        print(f"{key}: {value}")
    print(f"path: {toolchain.root}")
    return 0


def _recipe_extract(args: argparse.Namespace) -> int:
    from udquant.extract import dump_recipe, type_counts
    from udquant.recipe_commands import extract

    output = check_output_file(args.output, "--output", "a recipe udquant extracted",
                               is_extracted_recipe) if args.output else None
    document, layout = extract(args.source, file_glob=args.file, revision=args.revision,
                               token=os.environ.get("HF_TOKEN"), recipe_id=args.id, level=args.level)
    percent = 100 * layout.bytes_fetched / max(layout.bytes_total, 1)
    _note(f"read {len(layout.files)} header(s): {layout.bytes_fetched:,} bytes of {layout.bytes_total:,} "
                  f"({percent:.3f} %)")
    types = ", ".join(f"{k}: {v}" for k, v in type_counts(layout.tensors).items())
    rules = document["rules"]
    assert isinstance(rules, list)
    _note(f"{len(layout.tensors)} tensors ({types}) -> {len(rules)} rules, fidelity 100 %")
    text = dump_recipe(document)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, text)
        print(args.output)
    else:
        sys.stdout.write(text)
    return 0


def _recipe_show(args: argparse.Namespace) -> int:
    from udquant.recipe import load_recipe_ref
    from udquant.recipe_commands import layer_ranges, report_for_model

    recipe = load_recipe_ref(args.recipe)
    print(f"id: {recipe.id}\narch: {recipe.arch}\nbase: {recipe.base}")
    print(f"provenance: {recipe.provenance.get('kind', 'unknown')}: "
          f"{recipe.provenance.get('note') or recipe.provenance.get('source', '')}")
    for rule in recipe.rules:
        extra = f" layers {layer_ranges(list(rule.layers))}" if rule.layers is not None else ""
        extra += " (use_more_bits layers)" if rule.select == "more_bits" else ""
        print(f"  {rule.match} -> {rule.type}{extra}")
    if args.model:
        report = report_for_model(recipe, args.model)
        table = Table(title=f"on {args.model.name}", title_justify="left")
        table.add_column("role")
        table.add_column("types by layer")
        for role, by_type in report.roles.items():
            table.add_row(role, "; ".join(f"{t}: {layer_ranges(layers)}" for t, layers in by_type.items()))
        Console().print(table)
        print(", ".join(f"{k}: {v}" for k, v in report.counts.items()))
        print(f"estimated size {report.size_bytes / 1e9:.3f} GB, {report.bits_per_weight:.2f} bits per weight")
    return 0


def _recipe_check(args: argparse.Namespace) -> int:
    from udquant.errors import VerificationError
    from udquant.recipe import load_recipe_ref
    from udquant.recipe_commands import check

    fidelity = check(args.model, load_recipe_ref(args.recipe))
    print(f"fidelity: {fidelity.matched}/{fidelity.total} tensors ({fidelity.percent:.1f} %)")
    for line in fidelity.mismatches[:50]:
        print(f"  {line}")
    if fidelity.matched != fidelity.total:
        raise VerificationError(f"{args.model.name} differs from the recipe in "
                                f"{fidelity.total - fidelity.matched} tensors")
    return 0


def _recipe_refresh(args: argparse.Namespace) -> int:
    from udquant.library import recipes_dir
    from udquant.recipe_commands import refresh_recipes

    outcomes = refresh_recipes(args.tracked or recipes_dir() / "tracked.yaml", token=os.environ.get("HF_TOKEN"))
    for outcome in outcomes:
        print(f"{outcome.status:9} {outcome.recipe_id}  {outcome.detail}")
    failed = [o for o in outcomes if o.status == "failed"]
    return 1 if failed and len(failed) == len(outcomes) else 0


def _add_recipe_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    recipe = commands.add_parser("recipe", help="extract, show and check recipes")
    verbs = recipe.add_subparsers(dest="verb", required=True)
    extract = verbs.add_parser("extract", help="read a template GGUF's header into a recipe")
    extract.add_argument("source", help="a local .gguf (single file or first shard) or a Hub repo id")
    extract.add_argument("--file", help="glob of the template in the Hub repo, e.g. '*UD-Q5_K_XL*'")
    extract.add_argument("--revision", help="Hub revision of the template repo")
    extract.add_argument("--id", help="recipe id (default: <arch>/<level>)")
    extract.add_argument("--level", help="level name (default: from the file name)")
    extract.add_argument("-o", "--output", type=Path,
                         help="write the recipe here instead of stdout (replaces only a recipe extracted "
                              "from a template)")
    extract.set_defaults(func=_recipe_extract)
    show = verbs.add_parser("show", help="print a recipe; with --model, the types it gives that model")
    show.add_argument("recipe", help="library id (e.g. generic/UD-Q5_K_XL) or path")
    show.add_argument("--model", type=Path, help="a GGUF of the model (its header is enough)")
    show.set_defaults(func=_recipe_show)
    check = verbs.add_parser("check", help="how faithfully MODEL.gguf follows RECIPE (exit 5 below 100 %%)")
    check.add_argument("model", type=Path)
    check.add_argument("recipe")
    check.set_defaults(func=_recipe_check)
    refresh = verbs.add_parser("refresh", help="re-extract the tracked templates, rewrite changed recipes")
    refresh.add_argument("--tracked", type=Path, help="list of tracked templates (default: recipes/tracked.yaml)")
    refresh.set_defaults(func=_recipe_refresh)
    for parser in (extract, show, check, refresh):
        parser.add_argument("-v", "--verbose", action="store_true")


def job_main(argv: Sequence[str] | None = None) -> int:
    """udquant-job: the container entrypoint."""
    parser = argparse.ArgumentParser(prog="udquant-job", description="Make verified UD-style GGUF quants.")
    add_job_arguments(parser)
    parser.add_argument("--version", action="version", version=f"udquant {__version__}")
    args = parser.parse_args(_without_own_name(list(sys.argv[1:] if argv is None else argv), parser.prog))
    _configure_logging(args.verbose)
    return _run("job", _job, args)


def _without_own_name(argv: list[str], prog: str) -> list[str]:
    """argv without a leading program name. HF Jobs is sent the whole command line (udquant-job REPO ...): a runner
    that appends it to the image's ENTRYPOINT instead of replacing it starts `udquant-job udquant-job REPO ...`.
    Only dropped when a source follows, so that a local folder named udquant-job can still be the source."""
    if len(argv) > 1 and argv[0] == prog and not argv[1].startswith("-"):
        return argv[1:]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="udquant", description="UD-style GGUF quants of distills.")
    parser.add_argument("--version", action="version", version=f"udquant {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    job = commands.add_parser("job", help="run the whole pipeline (same as udquant-job)")
    add_job_arguments(job)
    job.set_defaults(func=_job)
    demo = commands.add_parser("demo", help="run the job offline on a bundled tiny model")
    demo.add_argument("--out-dir", type=Path, help="where the GGUF goes (default: ./udquant-out/<name>)")
    demo.add_argument("--eval", dest="evaluate", action="store_true", help="also measure KL divergence vs BF16")
    demo.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "udquant-demo",
                      help="intermediate files, reused on rerun (default: %(default)s)")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(func=_demo)
    _add_recipe_commands(commands)
    _add_eval_command(commands)
    add_dispatch_command(commands)
    toolchain = commands.add_parser("toolchain", help="show the llama.cpp build the job uses")
    toolchain.add_argument("-v", "--verbose", action="store_true")
    toolchain.set_defaults(func=_toolchain)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    return _run(args.command, args.func, args)


def job_entry() -> None:
    sys.exit(job_main())


def entry() -> None:
    sys.exit(main())
