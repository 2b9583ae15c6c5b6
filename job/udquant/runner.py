"""Run one external tool with an argv list, log its output, report progress, raise on failure."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from udquant.errors import ToolError
from udquant.progress import StageProgress

logger = logging.getLogger(__name__)

TAIL_LINES = 25
# "[  12/ 109] blk.0.attn_k.weight" (llama-quantize), "[3]1234.5," (perplexity/imatrix chunks),
# "Writing: 45%|" (the converter's tqdm bar).
_STEP = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")
_PERCENT = re.compile(r"(\d{1,3})%\|")


def _report(line: str, progress: StageProgress | None) -> None:
    if progress is None:
        return
    if match := _STEP.search(line):
        progress.step(int(match.group(1)), int(match.group(2)))
    elif match := _PERCENT.search(line):
        progress.step(int(match.group(1)), 100)
    progress.line(line)


def run_tool(argv: Sequence[str | os.PathLike[str]], *, stage: str, log_path: Path,
             env: Mapping[str, str] | None = None, cwd: Path | None = None,
             progress: StageProgress | None = None,
             hint_for: Mapping[str, str] | None = None) -> None:
    """Run argv, streaming its merged output to log_path; raise ToolError with the tail on failure.

    hint_for maps a substring of the tool's output to a hint shown with the error.
    """
    args = [str(a) for a in argv]
    tool = Path(args[1] if Path(args[0]).name.startswith("python") else args[0]).name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.debug("running %s", args)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    full_env = {**os.environ, **(env or {})}
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(args) + "\n")
        with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, text=True,
                              errors="replace", bufsize=1) as proc:
            assert proc.stdout is not None
            try:
                for raw in proc.stdout:
                    # tqdm redraws with carriage returns: keep the latest state of the line.
                    line = raw.rstrip("\n").rsplit("\r", 1)[-1]
                    log.write(line + "\n")
                    if line.strip():
                        tail.append(line)
                        _report(line, progress)
            except BaseException:
                proc.kill()
                raise
            returncode = proc.wait()
    if returncode != 0:
        text = "\n".join(tail)
        hint = next((h for needle, h in (hint_for or {}).items() if needle in text), None)
        raise ToolError(stage, tool, returncode, text, log_path, hint=hint)
