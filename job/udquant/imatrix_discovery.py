"""`--imatrix auto`: find the distill's own importance matrix on the Hub.

Order of preference (the first file that fits the model wins):
  1. mradermacher/<Name>-i1-GGUF: <Name>.imatrix.gguf, then the legacy imatrix.dat
  2. bartowski/<Name>-GGUF: <Name>.imatrix (legacy or GGUF), <Name>.imatrix.gguf
  3. the distill's own repo: *.imatrix.gguf, *.imatrix, imatrix.dat
  4. repos that declare the distill as their base model (quantized derivatives), same names
1 and 2 are found by name only: one whose card declares another base_model is skipped. Each
candidate is downloaded (a few MB) and checked against the model's tensor names and widths;
one that does not fit is skipped with a note. The base model's imatrix is never
used unless asked for (allow_base), and is then labelled as such.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download

from udquant.errors import ImatrixMismatchError, InputError, UdquantError
from udquant.gguf_header import GGUFHeader
from udquant.hub import HUB_ERRORS, declared_base_models
from udquant.imatrix import Imatrix, check_imatrix_fits, read_imatrix

logger = logging.getLogger(__name__)

OWN_REPO_PATTERNS = ("*.imatrix.gguf", "*.imatrix", "imatrix.dat", "*.imatrix.dat")
MAX_DERIVATIVES = 20


@dataclass(frozen=True)
class Candidate:
    repo_id: str
    filename: str
    origin: str  # "mradermacher", "bartowski", "own repo", "derivative"
    for_model: str  # whose imatrix it is
    is_base: bool = False
    # The base_model its repo's card declares, for repos found by name only: another author's
    # model of the same name (or the base, for a fine-tune that kept its name) has the same tensors.
    declared_for: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        what = f"{self.repo_id}/{self.filename} ({self.origin})"
        return f"base model {self.for_model}'s imatrix: {what}" if self.is_base else what


@dataclass(frozen=True)
class Search:
    imatrix: Imatrix | None
    candidate: Candidate | None
    skipped: tuple[str, ...]  # candidates that did not fit, with the reason


def _files(api: HfApi, repo_id: str) -> list[str]:
    try:
        return list(api.list_repo_files(repo_id))
    except HUB_ERRORS:
        return []


def candidates_for(api: HfApi, model_repo: str, *, is_base: bool = False) -> list[Candidate]:
    """Existing imatrix files for model_repo, in the order of preference."""
    name = model_repo.split("/")[1]
    found: list[Candidate] = []
    places = [
        (f"mradermacher/{name}-i1-GGUF", [f"{name}.imatrix.gguf", "imatrix.dat"], "mradermacher"),
        (f"bartowski/{name}-GGUF", [f"{name}.imatrix", f"{name}.imatrix.gguf"], "bartowski"),
    ]
    for repo_id, names, origin in places:
        try:
            info = api.model_info(repo_id)
        except HUB_ERRORS:
            continue
        files = {sibling.rfilename for sibling in info.siblings or []}
        declared = tuple(declared_base_models(info.card_data))
        found += [Candidate(repo_id, n, origin, model_repo, is_base, declared) for n in names if n in files]
    own = _files(api, model_repo)
    found += [Candidate(model_repo, n, "own repo", model_repo, is_base) for n in sorted(own)
              if any(fnmatch.fnmatch(n, p) for p in OWN_REPO_PATTERNS)]
    try:
        derivatives = [m.id for m in api.list_models(filter=f"base_model:quantized:{model_repo}",
                                                     limit=MAX_DERIVATIVES)]
    except HUB_ERRORS:
        derivatives = []
    for repo_id in sorted(d for d in derivatives if d not in {p[0] for p in places}):
        found += [Candidate(repo_id, n, "derivative", model_repo, is_base) for n in sorted(_files(api, repo_id))
                  if any(fnmatch.fnmatch(n, p) for p in OWN_REPO_PATTERNS)]
    return found


def find_imatrix(model_repo: str, base_models: tuple[str, ...], model: GGUFHeader, dest: Path, *,
                 token: str | None, allow_base: bool = False) -> Search:
    """Download and check candidates in order; the first that fits the model wins."""
    api = HfApi(token=token)
    candidates = candidates_for(api, model_repo)
    if allow_base:
        for base in base_models:
            candidates += candidates_for(api, base, is_base=True)
    skipped: list[str] = []
    for candidate in candidates:
        if candidate.declared_for and candidate.for_model not in candidate.declared_for:
            skipped.append(f"{candidate.label}: made for {', '.join(candidate.declared_for)} (its card's base_model)")
            continue
        try:
            path = Path(hf_hub_download(candidate.repo_id, candidate.filename, local_dir=dest / candidate.repo_id,
                                        token=token))
            imatrix = read_imatrix(path)
            check_imatrix_fits(imatrix, model)
        except ImatrixMismatchError as err:
            skipped.append(f"{candidate.label}: does not fit ({err.message.splitlines()[0]})")
            continue
        except UdquantError as err:
            skipped.append(f"{candidate.label}: unusable ({err.message.splitlines()[0]})")
            continue
        except HUB_ERRORS as err:
            skipped.append(f"{candidate.label}: unusable ({str(err).splitlines()[0]})")
            continue
        for note in skipped:
            logger.info("imatrix candidate skipped: %s", note)
        return Search(imatrix, candidate, tuple(skipped))
    for note in skipped:
        logger.warning("imatrix candidate skipped: %s", note)
    return Search(None, None, tuple(skipped))


def no_imatrix_error(model_repo: str, skipped: int) -> InputError:
    return InputError(
        f"no imatrix of {model_repo} was found on the Hub"
        + (f" ({skipped} candidates did not fit)" if skipped else "")
        + " and this llama.cpp build has no GPU backend to compute one quickly",
        hint="options: --imatrix compute (runs llama-imatrix here, slow on CPU), --imatrix PATH (a .gguf or "
             ".dat imatrix of this model), --imatrix none (no imatrix), or --allow-base-imatrix (use the base "
             "model's, labelled as such)")
