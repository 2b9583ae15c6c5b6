"""The output folder: the names udquant writes there, and what it may replace.

A user may point --out-dir at a folder holding their own files: before any work, the job learns
that the folder can be written and that it would replace only files udquant wrote there. A single
file a command writes where the user says (--json, --plot, recipe --output) likewise replaces only a
file of its own kind: a mistyped option value must not overwrite a GGUF.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import yaml

from udquant.convert import MMPROJ_TYPE
from udquant.errors import InputError
from udquant.resolve import ModelInfo
from udquant.workdir import file_in_the_way, pid_alive

RESULT_NAME = "udquant-result.json"
PLOT_NAME = "kld-vs-bpw.png"
CARD_NAME = "README.md"
# What write_outputs is writing, until the result JSON is there: a rerun after a kill may replace those files.
PENDING_NAME = ".udquant-writing.json"
# <out-dir>/split/<GGUF stem>/<key>/: the shards of a GGUF above --split-size-gb (publish.split_for_upload).
SPLIT_NAME = "split"
_SPLIT_KEY = re.compile(r"[0-9a-f]{12}(\.partial-\d+)?")


def gguf_file_name(model: ModelInfo, level: str) -> str:
    return f"{model.name}-{level}.gguf"


def mmproj_file_name(model: ModelInfo) -> str:
    return f"mmproj-{model.name}-{MMPROJ_TYPE.upper()}.gguf"


def recipe_file_name(model: ModelInfo, level: str) -> str:
    return f"{model.name}-{level}.recipe.yaml"


def output_file_names(model: ModelInfo, levels: Iterable[str], *, mmproj: bool = False,
                      plot: bool = False) -> list[str]:
    """The files write_outputs may put in the output folder besides the card and the result JSON."""
    names = [name for level in levels for name in (gguf_file_name(model, level), recipe_file_name(model, level))]
    return names + ([mmproj_file_name(model)] if mmproj else []) + ([PLOT_NAME] if plot else [])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The PNG text chunk udquant's plots carry (plot.py): what marks a plot as one udquant may replace.
PLOT_SOFTWARE = "udquant"
EVAL_JSON_KEYS = ("base", "eval_text", "eval")  # what `udquant eval --json` writes
_SMALL_FILE_BYTES = 16 << 20


def is_udquant_plot(path: Path) -> bool:
    """A PNG udquant drew: its Software text chunk names udquant, or matplotlib (earlier plots, and others')."""
    try:
        with path.open("rb") as file:
            start = file.read(4096)
    except OSError:
        return False
    return start.startswith(PNG_SIGNATURE) and any(b"Software\x00" + name in start
                                                   for name in (PLOT_SOFTWARE.encode(), b"Matplotlib"))


def is_eval_json(path: Path) -> bool:
    document = _small_document(path, json.loads)
    return isinstance(document, dict) and all(key in document for key in EVAL_JSON_KEYS)


def is_extracted_recipe(path: Path) -> bool:
    """A recipe `udquant recipe extract` wrote (read from a template), not one written or derived by hand."""
    document = _small_document(path, yaml.safe_load)
    provenance = document.get("provenance") if isinstance(document, dict) else None
    return isinstance(provenance, dict) and provenance.get("kind") == "template"


def _small_document(path: Path, parse: Callable[[str], Any]) -> Any:
    try:
        if path.stat().st_size > _SMALL_FILE_BYTES:
            return None
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def check_output_file(path: Path, option: str, kind: str, is_kind: Callable[[Path], bool]) -> Path:
    """The file to write for `option PATH`, learnt before any work: it can be written, and writing it replaces
    no file but one of its kind (`kind`, told by is_kind). A symlink is written through (its target is
    returned); a folder, a device or a pipe by that name is refused."""
    if len(path.name.encode()) > 255:
        raise InputError(f"{option} {path}: the file name is longer than 255 bytes", hint="give a shorter name")
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder, not a file", hint="give a file name")
    if (blocking := file_in_the_way(path.parent)) is not None:
        raise InputError(f"{option} {path}: {blocking} is a file, not a folder",
                         hint="give a path whose folders are folders (or do not exist yet)")
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise InputError(f"{option} {path} is not a regular file", hint="give the name of a file to write")
    _check_writable_folder(target.parent, f"{option} {path}: the folder {target.parent}", "give another path")
    if target.is_file() and target.stat().st_size > 0 and not is_kind(target):  # empty: e.g. made by mktemp
        raise InputError(f"{option} {path} exists and is not {kind}: it is not replaced",
                         hint="give a new file name, or move that file first")
    return target


def check_out_dir(out_dir: Path, model: ModelInfo, *, file_names: Collection[str] = (),
                  split_names: Collection[str] = ()) -> None:
    """Refuse an output folder where writing would replace what a user made, or that cannot be written
    (before any work).

    file_names are the files the job will write there (output_file_names): those that exist must be
    udquant's, listed by the result JSON of an earlier run for this model or by a killed run's
    pending record; the card and the result JSON are checked by their content. split_names are the
    GGUFs that may be split for the upload: their shard folders must hold only udquant's shards.
    """
    where = out_dir.resolve()
    if model.local_dir is not None and where.is_relative_to(model.local_dir.resolve()):
        raise InputError(f"--out-dir {out_dir} is inside the model folder {model.local_dir}",
                         hint="choose an output folder outside the model (its files would change the model)")
    _check_writable_folder(out_dir)
    folders = [name for name in (CARD_NAME, RESULT_NAME, *file_names) if (out_dir / name).is_dir()]
    if folders:
        raise InputError(f"{out_dir} holds folders where udquant writes files: {', '.join(folders)}",
                         hint="choose another --out-dir, or move them")
    card = out_dir / CARD_NAME
    if card.is_file() and not is_udquant_card(card.read_text(errors="replace")):
        raise InputError(f"{card} was not written by udquant and would be replaced",
                         hint="choose another --out-dir, or move that file")
    result = out_dir / RESULT_NAME
    if result.exists():
        previous = read_udquant_result(result)
        if previous is None:
            raise InputError(f"{result} was not written by udquant and would be replaced",
                             hint="choose another --out-dir, or move that file")
        made_from = previous["inputs"]["source"]
        if made_from != (model.repo_id or model.name):
            raise InputError(f"{out_dir} holds udquant's results for {made_from}, "
                             f"not for {model.repo_id or model.name}", hint="choose another --out-dir")
    pending_for = _pending_source(out_dir)
    if pending_for is not None and pending_for != (model.repo_id or model.name):
        raise InputError(f"{out_dir} holds the outputs of a stopped udquant run for {pending_for}, "
                         f"not for {model.repo_id or model.name}", hint="choose another --out-dir, or finish that run")
    ours = earlier_files(out_dir, model)
    theirs = sorted(name for name in file_names
                    if ((out_dir / name).exists() or (out_dir / name).is_symlink()) and name not in ours)
    if theirs:
        raise InputError(f"{out_dir} holds files udquant did not write and would replace: {', '.join(theirs)}",
                         hint="choose another --out-dir, or move those files")
    if split_names:
        _check_split_folders(out_dir / SPLIT_NAME, split_names)


def _check_split_folders(split: Path, gguf_names: Collection[str]) -> None:
    """The shard folders of these GGUFs are replaced whole: each must hold udquant's shards only."""
    if not split.is_dir() and (split.exists() or split.is_symlink()):
        raise InputError(f"{split} is a file where udquant puts the shards of large GGUFs",
                         hint="choose another --out-dir, or move that file")
    theirs = [f"{SPLIT_NAME}/{stem}" for stem in sorted(Path(name).stem for name in gguf_names)
              if not _is_udquant_split(split / stem, stem)]
    if theirs:
        raise InputError(f"{split.parent} holds folders udquant did not write and would replace: {', '.join(theirs)}",
                         hint="choose another --out-dir, or move those folders")


def _is_udquant_split(folder: Path, stem: str) -> bool:
    """Missing, or key folders (finished or left by a killed split) of this GGUF's shards and nothing else."""
    if not (folder.exists() or folder.is_symlink()):
        return True
    if folder.is_symlink() or not folder.is_dir():
        return False
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf")
    for key in folder.iterdir():
        if key.is_symlink() or not key.is_dir() or not _SPLIT_KEY.fullmatch(key.name):
            return False
        if any(entry.is_symlink() or not entry.is_file() or not shard.fullmatch(entry.name) for entry in key.iterdir()):
            return False
    return True


def _check_writable_folder(out_dir: Path, label: str | None = None, hint: str = "choose another --out-dir") -> None:
    """Learn now, not after hours of work, that the folder is one and can be written; label names it in errors."""
    label = label or f"--out-dir {out_dir}"
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise InputError(f"{label} is a file, not a folder", hint=hint)
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise InputError(f"{label} is not writable", hint=hint)
        return
    absolute = Path(os.path.abspath(out_dir))
    if (blocking := file_in_the_way(absolute)) is not None:
        raise InputError(f"{label} cannot be created: {blocking} is a file, not a folder", hint=hint)
    missing = []
    for folder in (absolute, *absolute.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    # Made and removed again: the job writes there only at its end, and a failed job leaves no trace.
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            made.append(folder)
    except OSError as err:
        raise InputError(f"{label} cannot be created: {err.strerror}", hint=hint) from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()


def read_udquant_result(path: Path) -> dict[str, Any] | None:
    """A result JSON udquant wrote (its version and the source it was made from), else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "udquant_version" not in data or not isinstance(data.get("inputs"), dict) \
            or not isinstance(data["inputs"].get("source"), str):
        return None
    return data


def earlier_files(out_dir: Path, model: ModelInfo) -> set[str]:
    """The files of the output folder earlier runs for this model wrote (one killed while writing too): a
    later run may replace them."""
    result = read_udquant_result(out_dir / RESULT_NAME)
    ours = pending_files(out_dir, model)
    if result is None or result["inputs"]["source"] != (model.repo_id or model.name):
        return ours
    if "out_dir_files" in result:
        return ours | files_written(result)
    # Written by a version before out_dir_files: every file named as udquant names this model's files.
    patterns = (f"{model.name}-*.gguf", f"{model.name}-*.recipe.yaml", mmproj_file_name(model), PLOT_NAME)
    return ours | {path.name for pattern in patterns for path in out_dir.glob(pattern) if path.is_file()}


def files_written(result: dict[str, Any]) -> set[str]:
    """The files of the output folder a udquant result JSON says udquant wrote."""
    names = {name for name in result.get("out_dir_files") or [] if isinstance(name, str)}
    for record in [*(result.get("levels") or []), result.get("mmproj")]:
        if not isinstance(record, dict) or record.get("kept_from"):  # kept: on the Hub, not written here
            continue
        recipe = record.get("recipe")
        names |= {name for name in (record.get("file"), recipe.get("file") if isinstance(recipe, dict) else None)
                  if isinstance(name, str)}
    if result.get("eval"):
        names.add(PLOT_NAME)
    return names


def pending_files(out_dir: Path, model: ModelInfo) -> set[str]:
    """What a run for this model that was killed while writing its outputs had begun to write."""
    pending = _pending_record(out_dir)
    if pending is None or pending.get("source") != (model.repo_id or model.name):
        return set()
    return {name for name in pending.get("files") or [] if isinstance(name, str)}


def _pending_source(out_dir: Path) -> str | None:
    """The model a run stopped while writing its outputs was for, if one was."""
    pending = _pending_record(out_dir)
    source = pending.get("source") if pending is not None else None
    return source if isinstance(source, str) else None


def _pending_record(out_dir: Path) -> dict[str, Any] | None:
    try:
        pending = json.loads((out_dir / PENDING_NAME).read_text())
    except (OSError, ValueError):
        return None
    return pending if isinstance(pending, dict) else None


def remove_own_partials(out_dir: Path, names: Iterable[str]) -> None:
    """Delete what a killed run left half-written of these files (named as workdir.partial_path names
    them), and nothing else: the folder may hold a user's own files."""
    patterns = [re.compile(re.escape(Path(name).stem) + r"\.partial-(\d+)" + re.escape(Path(name).suffix))
                for name in names]
    for entry in out_dir.iterdir():
        match = next((m for pattern in patterns if (m := pattern.fullmatch(entry.name))), None)
        if match and entry.is_file() and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)


def is_udquant_card(text: str) -> bool:
    if not text.startswith("---"):
        return False
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return False
    return isinstance(front, dict) and front.get("quantized_by") == "udquant"
