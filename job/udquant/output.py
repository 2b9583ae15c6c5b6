"""Write the job's outputs: GGUF files, recipe copies, the model card draft, the result JSON."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import yaml

from udquant import __version__
from udquant.convert import MMPROJ_TYPE
from udquant.errors import UdquantError
from udquant.evaluate import QuantEval, render_eval_table
from udquant.imatrix import Imatrix
from udquant.imatrix_discovery import Candidate
from udquant.library import data_file
from udquant.out_dir import (
    CARD_NAME,
    PENDING_NAME,
    PLOT_NAME,
    RESULT_NAME,
    earlier_files,
    gguf_file_name,
    is_udquant_card,
    mmproj_file_name,
    output_file_names,
    read_udquant_result,
    recipe_file_name,
    remove_own_partials,
)
from udquant.recipe import Recipe, type_bits
from udquant.resolve import ModelInfo
from udquant.toolchain import Toolchain
from udquant.verify import Verification
from udquant.workdir import atomic_output, write_text_atomic

if TYPE_CHECKING:
    from udquant.measure import EvalSettings



@dataclass(frozen=True)
class LevelOutput:
    level: str
    recipe: Recipe
    source: Path  # the verified file in the work directory
    verification: Verification


@dataclass(frozen=True)
class ImatrixUse:
    mode: str  # "none", "computed", "file" or "hub"
    imatrix: Imatrix | None
    calibration_sha256: str | None = None
    origin: Candidate | None = None  # where a Hub imatrix came from

    def describe(self) -> dict[str, Any]:
        if self.imatrix is None:
            return {"source": "none"}
        hub = {} if self.origin is None else {
            "repo": self.origin.repo_id, "origin": self.origin.origin, "for_model": self.origin.for_model,
            "is_base_model_imatrix": self.origin.is_base, "label": self.origin.label}
        return {"source": self.mode, **hub, "file": self.imatrix.path.name, "format": self.imatrix.format,
                "sha256": sha256_file(self.imatrix.path), "datasets": [_file_name(d) for d in self.imatrix.datasets],
                "chunk_count": self.imatrix.chunk_count, "chunk_size": self.imatrix.chunk_size,
                "entries": len(self.imatrix.widths), "calibration_sha256": self.calibration_sha256}


def _file_name(dataset: str) -> str:
    """llama-imatrix records the calibration text as given: a local path's folders stay out of cards."""
    return dataset.replace("\\", "/").rsplit("/", 1)[-1]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _place(source: Path, dest: Path, *, link: bool) -> None:
    """Put source at dest atomically; hard-link large files of our own work dir (no second copy)."""
    if dest.exists() and dest.samefile(source):
        return  # rename() of two links to one file is a no-op that would leave the partial behind
    with atomic_output(dest) as partial:
        if link:
            try:
                os.link(source, partial)
            except OSError:  # another file system
                shutil.copyfile(source, partial)
        else:
            shutil.copyfile(source, partial)


def kept_levels(previous: dict[str, Any] | None, remote_files: frozenset[str], made: set[str]) -> list[dict[str, Any]]:
    """The levels an earlier run published that this one does not make again and whose files are all still there."""
    if not previous:
        return []
    kept = []
    for record in previous.get("levels") or []:
        if not isinstance(record, dict) or record.get("level") in made:
            continue
        files = record.get("parts") or [record.get("file")]
        if all(isinstance(name, str) and name in remote_files for name in files):
            kept.append(record | {"kept_from": _earlier_run(previous, record)})
    return kept


def kept_mmproj(previous: dict[str, Any] | None, remote_files: frozenset[str]) -> dict[str, Any] | None:
    """The mmproj file an earlier run published, when this run makes none and it is still there."""
    record = previous.get("mmproj") if previous else None
    if previous is None or not isinstance(record, dict) or record.get("file") not in remote_files:
        return None
    return record | {"kept_from": _earlier_run(previous, record)}


def _earlier_run(previous: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    return dict(record.get("kept_from") or {
        "created_at": previous.get("created_at"),
        "llama_cpp": (previous.get("llama_cpp") or {}).get("tag"),
        "imatrix": (previous.get("imatrix") or {}).get("source")})


def _file_cell(level: dict[str, Any]) -> str:
    parts = level.get("parts")
    return f"`{parts[0]}` ({len(parts)} parts)" if parts else f"`{level['file']}`"


def _imatrix_intro(imatrix: dict[str, Any]) -> str:
    if imatrix["source"] == "none":
        return "applied without an importance matrix"
    if imatrix.get("is_base_model_imatrix"):
        return "applied with an importance matrix of its **base model** (none of this model was found)"
    if imatrix["source"] == "file":
        return "applied with an importance matrix given by whoever ran it (see below)"
    return "applied with an importance matrix of **this** model (not of its base)"


def _provenance_text(provenance: dict[str, Any]) -> str:
    return str(provenance.get("note") or provenance.get("kind") or "unknown")


def render_card(model: ModelInfo, levels: list[dict[str, Any]], imatrix: dict[str, Any],
                toolchain: Toolchain, output_repo: str | None = None, eval_section: str = "",
                mmproj: dict[str, Any] | None = None) -> str:
    tags = ["gguf", "ud-quant", "quantized", "udquant"]
    if imatrix["source"] != "none":
        tags.insert(1, "imatrix")
    # base_model must be a Hub model id: a local folder's name is none (and the Hub checks it).
    front: dict[str, Any] = {"base_model": model.repo_id, "base_model_relation": "quantized"} if model.repo_id else {}
    front |= dict(model.license)  # a quant is under its source's license
    front |= {
        "library_name": "gguf",
        "tags": tags,
        "quantized_by": "udquant",
    }
    file_rows = "\n".join(
        f"| {lv['level']} | {_file_cell(lv)} | {lv['size'] / 1e9:.2f} GB | {lv['bits_per_weight']:.2f} "
        f"| `{lv['recipe']['id']}` |" for lv in levels)
    earlier = [lv for lv in levels if lv.get("kept_from")]
    notes = "".join(
        f"\n- Kept from an earlier run: {lv['level']} (made {lv['kept_from'].get('created_at')} with llama.cpp "
        f"{lv['kept_from'].get('llama_cpp')}, importance matrix: {lv['kept_from'].get('imatrix')})" for lv in earlier)
    made_now = [lv for lv in levels if not lv.get("kept_from")]
    if mmproj is not None:
        file_rows += (f"\n| vision | `{mmproj['file']}` | {mmproj['size'] / 1e9:.2f} GB | "
                      f"{type_bits(mmproj['type']):.2f} | the vision tower and projector (mmproj) |")
        made = (f", kept from an earlier run (made {mmproj['kept_from'].get('created_at')} with llama.cpp "
                f"{mmproj['kept_from'].get('llama_cpp')})" if mmproj.get("kept_from") else "")
        notes += (f"\n- Vision: `{mmproj['file']}` ({mmproj['type'].upper()}){made}; `-hf` finds it, "
                  "with `-m` pass it as `--mmproj`")
    elif model.vision_weights:
        notes += "\n- Text only: the source's vision tower is not in these files (no mmproj file)"
    type_rows = "\n".join(f"- **{lv['level']}**: {lv['summary']}" for lv in levels)
    provenance = "; ".join(f"`{lv['recipe']['id']}`: {_provenance_text(lv['recipe']['provenance'])}"
                           for lv in made_now)
    if imatrix["source"] == "none":
        imatrix_text = "none"
    else:
        datasets = ", ".join(imatrix["datasets"]) or "not recorded"
        where = {"computed": "computed by udquant on this model", "file": "given by the user",
                 "hub": imatrix.get("label", "")}[imatrix["source"]]
        imatrix_text = f"{where} (`{imatrix['file']}`, datasets: {datasets}, {imatrix['chunk_count']} chunks)"
        if imatrix.get("is_base_model_imatrix"):
            imatrix_text += " — **the base model's imatrix, not the distill's** (asked for with --allow-base-imatrix)"
    template = Template(data_file("card.md.tmpl").read_text())
    text = template.substitute(
        front_matter=yaml.safe_dump(front, sort_keys=False).strip(),
        title=f"{model.name} UD GGUF",
        source_label=model.repo_id or model.name,
        source_link=f"https://huggingface.co/{model.repo_id}" if model.repo_id else ".",
        source_revision=f" at revision `{model.revision}`" if model.revision else "",
        file_rows=file_rows, type_rows=type_rows, eval_section=eval_section, provenance=provenance,
        imatrix=imatrix_text, imatrix_intro=_imatrix_intro(imatrix), notes=notes,
        llama_cpp=f"{toolchain.tag} ({toolchain.commit}, {toolchain.backend})",
        run_model=f"-hf {output_repo}:{levels[0]['level']}" if output_repo
        else f"-m {(levels[0].get('parts') or [levels[0]['file']])[0]}",
    )
    check_card(text, front)
    return text


def check_card(text: str, expected: dict[str, Any]) -> None:
    """Parse the card as the Hub will (huggingface_hub's ModelCard) and compare its metadata."""
    from huggingface_hub import ModelCard

    data = ModelCard(text).data.to_dict()  # type: ignore[no-untyped-call]
    wrong = [key for key, value in expected.items() if data.get(key) != value]
    if wrong:
        raise UdquantError(f"the rendered model card's metadata is wrong for: {', '.join(wrong)}")


@dataclass(frozen=True)
class OutputFiles:
    ggufs: tuple[Path, ...]
    recipes: tuple[Path, ...]
    card: Path
    result: Path
    plot: Path | None = None

    def for_upload(self) -> dict[str, Path]:
        extra = (self.plot,) if self.plot else ()
        return {p.name: p for p in (*self.recipes, *extra, self.card, self.result)}


def write_outputs(out_dir: Path, model: ModelInfo, levels: list[LevelOutput], imatrix: ImatrixUse,
                  toolchain: Toolchain, timings: dict[str, dict[str, Any]], *,
                  no_mtp: bool = False, output_repo: str | None = None, evals: Sequence[QuantEval] = (),
                  eval_settings: EvalSettings | None = None, split: Callable[[Path], list[Path]] | None = None,
                  kept: Sequence[dict[str, Any]] = (), mmproj: Path | None = None,
                  kept_mmproj: dict[str, Any] | None = None) -> OutputFiles:
    """Place verified files and write card and result JSON into out_dir.

    split turns a GGUF into the files to upload (its shards when large); kept and kept_mmproj
    are records of files an earlier run published and this one leaves in place.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_file_names(model, [level.level for level in levels], mmproj=mmproj is not None, plot=bool(evals))
    remove_own_partials(out_dir, [*names, CARD_NAME, RESULT_NAME, PENDING_NAME])
    source = model.repo_id or model.name
    written = earlier_files(out_dir, model)
    write_text_atomic(out_dir / PENDING_NAME,
                      json.dumps({"source": source, "files": sorted(written | set(names))}, indent=2) + "\n")
    _withdraw_earlier_result(out_dir)
    level_records = []
    ggufs, recipes = [], []
    for level in levels:
        name = gguf_file_name(model, level.level)
        _place(level.source, out_dir / name, link=True)
        parts = split(out_dir / name) if split else [out_dir / name]
        ggufs.extend(parts)
        recipe_name = recipe_file_name(model, level.level)
        if level.recipe.source_path is not None:
            # A copy: a link would let an edit of the output change the library's recipe.
            _place(level.recipe.source_path, out_dir / recipe_name, link=False)
            recipes.append(out_dir / recipe_name)
        check = level.verification
        level_records.append({
            "level": level.level, "file": name, "size": (out_dir / name).stat().st_size,
            "sha256": sha256_file(out_dir / name), "bits_per_weight": round(check.bits_per_weight, 4),
            "type_counts": check.type_counts, "summary": check.summary, "n_tensors": check.n_tensors,
            "recipe": {"id": level.recipe.id, "base": level.recipe.base, "file": recipe_name,
                       "sha256": level.recipe.digest, "provenance": level.recipe.provenance},
        } | ({"parts": [p.name for p in parts]} if len(parts) > 1 else {}))
    level_records += kept
    mmproj_record = kept_mmproj
    if mmproj is not None:
        name = mmproj_file_name(model)
        _place(mmproj, out_dir / name, link=True)
        ggufs.append(out_dir / name)
        mmproj_record = {"file": name, "size": (out_dir / name).stat().st_size, "sha256": sha256_file(out_dir / name),
                         "type": MMPROJ_TYPE}
    imatrix_record = imatrix.describe()
    plot = None
    if evals:
        from udquant.plot import plot_kld_vs_bpw

        plot = plot_kld_vs_bpw(evals, out_dir / PLOT_NAME, title=f"{model.name}: KL divergence vs size")
    written |= {gguf_file_name(model, level.level) for level in levels} | {path.name for path in recipes}
    if mmproj is not None:
        written.add(mmproj_file_name(model))
    if plot is not None:
        written.add(plot.name)
    result = {
        "udquant_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {"source": source, "repo_id": model.repo_id,
                   "revision": model.revision, "hf_architecture": model.hf_architecture,
                   "llama_arch": model.llama_arch, "n_params": model.n_params,
                   "no_mtp": no_mtp},
        "output_repo": output_repo,
        "llama_cpp": toolchain.describe(),
        "imatrix": imatrix_record,
        "levels": level_records,
        "mmproj": mmproj_record,
        "eval": [row.describe() for row in evals],
        "eval_text": eval_settings.describe() if eval_settings is not None and evals else None,
        "timings": timings,
        # What udquant wrote into this folder, this run or earlier ones: a rerun may replace these.
        "out_dir_files": sorted(name for name in written if (out_dir / name).is_file()),
    }
    write_text_atomic(out_dir / CARD_NAME, render_card(model, level_records, imatrix_record, toolchain, output_repo,
                                                 eval_section=_eval_section(evals, eval_settings),
                                                 mmproj=mmproj_record))
    result_path = out_dir / RESULT_NAME
    write_text_atomic(result_path, json.dumps(result, indent=2) + "\n")
    (out_dir / PENDING_NAME).unlink(missing_ok=True)
    return OutputFiles(tuple(ggufs), tuple(recipes), out_dir / CARD_NAME, result_path, plot)


def _withdraw_earlier_result(out_dir: Path) -> None:
    """Remove an earlier run's result JSON and card before any file they describe is replaced: a run stopped from
    here on must not leave a folder that looks finished but describes other files. The pending record, written
    first, keeps the files they listed udquant's, so the next run may still replace them."""
    result = out_dir / RESULT_NAME
    if result.is_file() and read_udquant_result(result) is not None:
        result.unlink()
    card = out_dir / CARD_NAME
    if card.is_file() and is_udquant_card(card.read_text(errors="replace")):
        card.unlink()


def _eval_section(evals: Sequence[QuantEval], settings: EvalSettings | None) -> str:
    if not evals:
        return ""
    first = evals[0].result
    text = "udquant's bundled held-out English text" if settings is None or settings.text is None \
        else f"`{settings.text_path.name}`"
    return (f"## Quality\n\nKL divergence against the BF16 model on {text} ({first.chunks} chunks of "
            f"{first.context} tokens), for each level and for llama.cpp's standard quant of the same base type "
            f"with the same imatrix:\n\n{render_eval_table(evals)}\n\n![KLD vs bits per weight]({PLOT_NAME})\n")
