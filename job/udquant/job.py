"""The job: resolve -> fetch -> convert -> imatrix -> quantize -> verify -> output.

It composes the stage functions over plain dataclasses; each stage's result is kept in a
work directory keyed by its inputs, so a rerun after a kill picks up where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from udquant.convert import MMPROJ_TYPE, check_mmproj_pair, convert_to_gguf, export_mmproj
from udquant.errors import InputError, RecipeError
from udquant.evaluate import QuantEval
from udquant.fetch import bytes_in, check_disk_space, fetch_model, model_dir_for
from udquant.gguf_header import GGUFHeader, read_gguf_header
from udquant.imatrix import Imatrix, ImatrixSettings, check_imatrix_fits, compute_imatrix, read_imatrix
from udquant.imatrix_discovery import find_imatrix, no_imatrix_error
from udquant.library import data_file
from udquant.measure import EvalSettings, eval_disk_bytes, evaluate_levels, require_plotting
from udquant.out_dir import SPLIT_NAME, check_out_dir, gguf_file_name, mmproj_file_name, output_file_names
from udquant.output import ImatrixUse, LevelOutput, kept_levels, kept_mmproj, sha256_file, write_outputs
from udquant.progress import stage_progress
from udquant.publish import DEFAULT_SPLIT_BYTES, Publication, Target, plan_target, publish, split_for_upload
from udquant.quantize import check_imatrix_coverage, quantize_model
from udquant.recipe import (
    DEFAULT_LEVEL,
    QuantPlan,
    Recipe,
    check_fallbacks,
    find_recipe,
    load_recipe_ref,
    main_layer_count,
    plan_quantization,
    type_bits,
)
from udquant.resolve import ModelInfo, check_mtp_option, resolve_model
from udquant.toolchain import Toolchain, find_toolchain
from udquant.verify import Verification, verify_quantized
from udquant.workdir import StageDir, check_work_dir, find_stage, hold_model_lock, model_log_path, open_stage

logger = logging.getLogger(__name__)

DEFAULT_IMATRIX_CONTEXT = 512
IMATRIX_MODES = ("none", "compute", "auto")


@dataclass(frozen=True)
class JobOptions:
    source: str
    levels: tuple[str, ...] | None = None  # None: not given: --recipe's own level, else DEFAULT_LEVEL
    recipe: str = "auto"  # auto: the library's recipe per level; else a library id or a recipe file
    imatrix: str = "auto"  # auto | none | compute | path to an imatrix file
    allow_base_imatrix: bool = False
    out_dir: Path | None = None
    work_dir: Path = Path("udquant-out/.work")
    revision: str | None = None
    no_mtp: bool | None = None  # None: decide from config and weights
    mmproj: bool = True  # export a vision tower, when the model has one, as an mmproj file
    calibration: Path | None = None
    imatrix_chunks: int | None = None  # None: all the calibration text holds
    imatrix_context: int = DEFAULT_IMATRIX_CONTEXT
    threads: int | None = None
    disk_reserve: int = 1_000_000_000
    upload: bool | None = None  # None: upload when the source is a Hub repo and a token is set
    output_repo: str | None = None
    private: bool = False
    split_bytes: int = DEFAULT_SPLIT_BYTES
    evaluate: bool = False  # measure KLD against BF16 for every level and the standard quant
    eval_settings: EvalSettings = field(default_factory=EvalSettings)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class JobResult:
    out_dir: Path
    result_json: Path
    model: ModelInfo
    levels: tuple[LevelOutput, ...]
    timings: dict[str, dict[str, Any]]
    publication: Publication | None = None


class Timings:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"seconds": 0.0, "cached": False}
        start = time.monotonic()
        logger.info("%s: started", name)
        yield entry
        entry["seconds"] = round(time.monotonic() - start, 3)
        self.stages[name] = entry
        logger.info("%s: %s in %.1f s", name, "reused" if entry["cached"] else "done", entry["seconds"])


def will_upload(upload: bool | None, *, from_hub: bool, token: str | None) -> bool:
    """--upload/--no-upload, else the default: a Hub repo is uploaded when a token is set, a local folder is not."""
    return upload if upload is not None else from_hub and bool(token)


def _model_fingerprint(model: ModelInfo) -> dict[str, Any]:
    if model.repo_id:
        return {"repo_id": model.repo_id, "revision": model.revision}
    assert model.local_dir is not None
    files = sorted(p for p in model.local_dir.iterdir() if p.is_file())
    return {"files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def _named_recipe(options: JobOptions) -> Recipe | None:
    """--recipe's recipe (None for auto); --quant levels given with it must be its own level."""
    if options.recipe == "auto":
        return None
    recipe = load_recipe_ref(options.recipe)
    if options.levels is not None and options.levels != (recipe.level,):
        raise InputError(f"--recipe {options.recipe} makes {recipe.level}, and --quant asks for "
                         f"{', '.join(options.levels)}", hint="give either --recipe or --quant levels")
    return recipe


def _recipes_for(options: JobOptions, model: ModelInfo, named: Recipe | None) -> list[Recipe]:
    if named is not None:
        recipes = [named]
    else:
        recipes = [find_recipe(level, model.llama_arch) for level in options.levels or (DEFAULT_LEVEL,)]
    for recipe in recipes:
        if recipe.arch not in ("any", model.llama_arch):
            raise RecipeError(f"recipe {recipe.id} is for architecture {recipe.arch}, "
                              f"the model is {model.llama_arch}")
    return recipes


def _estimate_bytes(model: ModelInfo, recipes: list[Recipe], downloads: bool,
                    evaluation: EvalSettings | None = None, split_bytes: int | None = None) -> int:
    """A generous estimate of what the job writes: download, BF16, one file per level (twice when
    it is split for the upload), and with --eval the base logits and one standard quant per base type."""
    bf16 = model.n_params * 2
    level_bytes = [model.n_params * (_catch_all_bits(r) + 1) / 8 for r in recipes]
    split_copies = [size for size in level_bytes if split_bytes is not None and size > split_bytes]
    total = (model.weights_bytes if downloads else 0) + bf16 + sum(level_bytes) + sum(split_copies)
    if evaluation is not None:
        references = len({r.base for r in recipes}) * max(level_bytes)
        total += eval_disk_bytes(evaluation, model.vocab_size, int(references))
    return int(total)


def _catch_all_bits(recipe: Recipe) -> float:
    return type_bits(recipe.rules[-1].type)


def _run_stage(timings: Timings, stage: StageDir, work: Callable[[Path], Path], output_name: str,
               **record: Any) -> Path:
    with timings.stage(stage.stage) as entry:
        done = stage.done_output()
        if done is not None:
            entry["cached"] = True
            return done
        start = time.monotonic()
        output = work(stage.path / output_name)
        stage.mark_done(output, time.monotonic() - start, **record)
        return output


def _prepare_imatrix(options: JobOptions, model: ModelInfo, toolchain: Toolchain, bf16: Path,
                     bf16_header: GGUFHeader, convert_key: str, timings: Timings) -> ImatrixUse:
    if options.imatrix == "none":
        return ImatrixUse("none", None)
    if options.imatrix not in IMATRIX_MODES:
        imatrix = read_imatrix(Path(options.imatrix))
        check_imatrix_fits(imatrix, bf16_header)
        if any("/" in d or "\\" in d for d in imatrix.datasets):
            logger.warning("%s records its calibration text as %s: llama-quantize copies that into the GGUF's "
                           "metadata (quantize.imatrix.dataset); the card names the file only",
                           imatrix.path.name, ", ".join(imatrix.datasets))
        return ImatrixUse("file", imatrix)
    if options.imatrix == "auto" and model.repo_id is not None:
        with timings.stage("find imatrix"):
            search = find_imatrix(model.repo_id, model.base_models, bf16_header, options.work_dir / "imatrix-hub",
                                  token=options.token, allow_base=options.allow_base_imatrix)
        if search.imatrix is not None and search.candidate is not None:
            logger.info("imatrix: using %s", search.candidate.label)
            return ImatrixUse("hub", search.imatrix, origin=search.candidate)
        if not toolchain.has_gpu:
            raise no_imatrix_error(model.repo_id, len(search.skipped))
        logger.info("imatrix: none found on the Hub; computing one on the GPU")
    calibration = options.calibration or data_file("calibration.txt")
    calibration_sha = sha256_file(calibration)
    settings = ImatrixSettings(calibration, options.imatrix_chunks, options.imatrix_context)
    _, nextn_layers = main_layer_count(bf16_header.metadata)
    stage = open_stage(options.work_dir, "imatrix", {
        "bf16": convert_key, "calibration": calibration_sha, "chunks": settings.chunks,
        "context": settings.context, "nextn": nextn_layers, "llama_cpp": toolchain.tree_sha256,
        "backend": toolchain.backend})

    def work(output: Path) -> Path:
        with stage_progress("imatrix") as progress:
            return compute_imatrix(toolchain, bf16, settings, output, log_path=stage.log(),
                                   nextn_layers=nextn_layers, threads=options.threads, progress=progress)

    path = _run_stage(timings, stage, work, "imatrix.gguf")
    imatrix = read_imatrix(path)
    check_imatrix_fits(imatrix, bf16_header)
    return ImatrixUse("computed", imatrix, calibration_sha)


def _export_mmproj(options: JobOptions, model: ModelInfo, model_dir: Path, toolchain: Toolchain,
                   fingerprint: dict[str, Any], timings: Timings) -> Path:
    stage = open_stage(options.work_dir, "mmproj", {
        "model": fingerprint, "name": model.name, "type": MMPROJ_TYPE, "llama_cpp": toolchain.tree_sha256})

    def export(output: Path) -> Path:
        with stage_progress("mmproj") as progress:
            return export_mmproj(toolchain, model_dir, output, model_name=model.name, log_path=stage.log(),
                                 progress=progress)

    return _run_stage(timings, stage, export, "mmproj.gguf")


def _quantize_level(options: JobOptions, toolchain: Toolchain, bf16: Path, convert_key: str,
                    plan: QuantPlan, imatrix: Imatrix | None, timings: Timings) -> tuple[Path, Verification]:
    level = plan.recipe.level
    stage = open_stage(options.work_dir, "quantize", {
        "bf16": convert_key, "plan": plan.digest, "base": plan.recipe.base,
        "imatrix": sha256_file(imatrix.path) if imatrix else None,
        "llama_cpp": toolchain.tree_sha256})
    with timings.stage(f"quantize {level}") as entry:
        output = stage.done_output()
        entry["cached"] = output is not None
        start = time.monotonic()
        if output is None:
            with stage_progress(level) as progress:
                output = quantize_model(toolchain, bf16, plan, stage.path / "model.gguf", imatrix=imatrix,
                                        log_path=stage.log(), threads=options.threads, progress=progress)
        verification = verify_quantized(output, plan)
        # Marked done only once verified: a rerun re-quantizes a file that failed.
        if not entry["cached"]:
            stage.mark_done(output, time.monotonic() - start, level=level)
    return output, verification


def run_job(options: JobOptions) -> JobResult:
    """Run the whole pipeline for one model and every requested level."""
    if options.imatrix not in IMATRIX_MODES and not Path(options.imatrix).is_file():
        raise InputError(f"--imatrix must be auto, none, compute or an existing file, not {options.imatrix!r}")
    check_work_dir(options.work_dir)
    named_recipe = _named_recipe(options)
    if options.evaluate:  # before hours of work, not after
        options.eval_settings.check()
        require_plotting()
    timings = Timings()
    with timings.stage("resolve"):
        model = resolve_model(options.source, revision=options.revision, token=options.token)
        check_mtp_option(model, options.no_mtp)
        recipes = _recipes_for(options, model, named_recipe)
        toolchain = find_toolchain()
        early_imatrix = read_imatrix(Path(options.imatrix)) if options.imatrix not in IMATRIX_MODES else None
        upload = will_upload(options.upload, from_hub=model.repo_id is not None, token=options.token)
        target = _plan_upload(options, model) if upload else None
    # Jobs for models of one name share stage folders and the default output folder: in one work dir
    # they take turns, even from containers sharing its volume (see hold_model_lock).
    with hold_model_lock(options.work_dir, model.name, model.repo_id or model.name) as waited:
        if waited and target is not None:  # the job it waited for may have uploaded to the same repo
            target = _plan_upload(options, model)
        return _make_quants(options, model, recipes, toolchain, early_imatrix, target, timings)


def _plan_upload(options: JobOptions, model: ModelInfo) -> Target:
    return plan_target(model.name, model.repo_id or model.name, output_repo=options.output_repo,
                       private=options.private, token=options.token)


def _make_quants(options: JobOptions, model: ModelInfo, recipes: list[Recipe], toolchain: Toolchain,
                 early_imatrix: Imatrix | None, target: Target | None, timings: Timings) -> JobResult:
    """Everything after resolve, while this job holds the model's lock in the work dir."""
    no_mtp = model.needs_no_mtp if options.no_mtp is None else options.no_mtp
    if model.needs_no_mtp:
        lacking = (f"config declares {model.declared_mtp_layers} MTP layer(s) the weights lack"
                   if model.declared_mtp_layers else "the weights hold no MTP layers")
        logger.warning("%s: %s", lacking,
                       "converting with --no-mtp" if no_mtp else "--mtp was given, so the converter will look for them")
    out_dir = options.out_dir or Path("udquant-out") / model.name
    vision = model.vision_weights

    def check_out() -> None:
        check_out_dir(out_dir, model, file_names=output_file_names(
            model, [recipe.level for recipe in recipes], mmproj=bool(vision) and options.mmproj,
            plot=options.evaluate), split_names=[gguf_file_name(model, recipe.level) for recipe in recipes]
            if target else ())

    check_out()
    if vision and not options.mmproj:
        logger.warning("%s has a vision tower (%d tensors): --no-mmproj, so only the text model is published",
                       model.name, len(vision))
    fingerprint = _model_fingerprint(model)
    convert_inputs = {"model": fingerprint, "name": model.name, "no_mtp": no_mtp,
                      "llama_cpp": toolchain.tree_sha256}
    needed = _estimate_bytes(model, recipes, model.repo_id is not None,
                             options.eval_settings if options.evaluate else None,
                             split_bytes=options.split_bytes if target else None)
    # A rerun after a kill needs no room for what the killed run already downloaded or converted.
    already = bytes_in(model_dir_for(model, options.work_dir / "downloads")) if model.repo_id else 0
    if (converted := find_stage(options.work_dir, "convert", convert_inputs).done_output()) is not None:
        already += converted.stat().st_size
    logger.debug("disk: about %d bytes needed, %d of them already here from an earlier run", needed, already)
    check_disk_space(options.work_dir, max(needed - already, 0), reserve=options.disk_reserve)

    with timings.stage("fetch"):
        model_dir = fetch_model(model, options.work_dir / "downloads", token=options.token)

    convert_stage = open_stage(options.work_dir, "convert", convert_inputs)

    def convert(output: Path) -> Path:
        with stage_progress("convert") as progress:
            return convert_to_gguf(toolchain, model_dir, output, no_mtp=no_mtp, model_name=model.name,
                                   log_path=convert_stage.log(), progress=progress)

    bf16 = _run_stage(timings, convert_stage, convert, "model-bf16.gguf")
    # Before the imatrix and quantizing: a vision tower the converter cannot export stops the job early.
    mmproj = None
    if vision and options.mmproj:
        if (model_dir / "preprocessor_config.json").is_file():
            mmproj = _export_mmproj(options, model, model_dir, toolchain, fingerprint, timings)
        else:  # the converter needs its image mean and std
            logger.warning("%s has a vision tower but no preprocessor_config.json: only the text model is "
                           "published", model.name)
    bf16_header = read_gguf_header(bf16)
    plans = [plan_quantization(recipe, bf16_header) for recipe in recipes]
    if early_imatrix is not None:
        check_imatrix_fits(early_imatrix, bf16_header)
    for plan in plans:
        check_fallbacks(plan)  # before the imatrix and every quantize, not after
        if options.imatrix in ("none", "compute"):  # what the imatrix will cover is known before it is made
            check_imatrix_coverage(plan, None, to_compute=options.imatrix == "compute")
    imatrix = _prepare_imatrix(options, model, toolchain, bf16, bf16_header, convert_stage.key, timings)
    for plan in plans:  # before the first level is made
        check_imatrix_coverage(plan, imatrix.imatrix)

    levels = []
    for plan in plans:
        path, verification = _quantize_level(options, toolchain, bf16, convert_stage.key, plan,
                                             imatrix.imatrix, timings)
        logger.info("%s: %s; %.2f bits per weight", plan.recipe.level, verification.summary,
                    verification.bits_per_weight)
        levels.append(LevelOutput(plan.recipe.level, plan.recipe, path, verification))

    if mmproj is not None:  # the smallest level: the fastest load, and the one most changed by quantizing
        smallest = min(levels, key=lambda lv: lv.source.stat().st_size)
        with timings.stage("mmproj-check"):
            check_mmproj_pair(toolchain, smallest.source, mmproj, image=data_file("vision-check.png"),
                              log_path=model_log_path(options.work_dir, model.name, "mmproj-check"),
                              threads=options.threads)
        logger.info("mmproj: %s loads with %s and reads an image", mmproj_file_name(model), smallest.level)

    evals: list[QuantEval] = []
    if options.evaluate:
        with timings.stage("eval"):
            evals = evaluate_levels(toolchain, bf16, convert_stage.key, levels, imatrix.imatrix,
                                    options.eval_settings, options.work_dir, threads=options.threads,
                                    disk_reserve=options.disk_reserve)
    def split(gguf: Path) -> list[Path]:  # the card must name the files the repo will hold
        return split_for_upload(toolchain, gguf, gguf.parent / SPLIT_NAME, options.split_bytes,
                                log_path=model_log_path(options.work_dir, model.name, "publish"))

    with timings.stage("output"):
        # Again: another model's job given the same --out-dir may have written there since (its stages
        # stay in the work dir, so a rerun with another --out-dir redoes none of them).
        check_out()
        kept = kept_levels(target.previous, target.remote_files, {lv.level for lv in levels}) if target else []
        earlier_mmproj = kept_mmproj(target.previous, target.remote_files) if target and mmproj is None else None
        outputs = write_outputs(out_dir, model, levels, imatrix, toolchain, timings.stages, no_mtp=no_mtp,
                                output_repo=target.repo_id if target else None, evals=evals,
                                eval_settings=options.eval_settings if options.evaluate else None,
                                split=split if target else None, kept=kept, mmproj=mmproj,
                                kept_mmproj=earlier_mmproj)
    publication = None
    if target is not None:
        assert options.token is not None
        with timings.stage("publish"):
            files = {gguf.name: gguf for gguf in outputs.ggufs} | outputs.for_upload()
            publication = publish(target, files, token=options.token, volatile=frozenset({outputs.result.name}),
                                  gguf_stems=[Path(gguf_file_name(model, lv.level)).stem for lv in levels],
                                  message=f"udquant: {', '.join(lv.level for lv in levels)} of "
                                          f"{model.repo_id or model.name}")
    return JobResult(out_dir, outputs.result, model, tuple(levels), timings.stages, publication)
