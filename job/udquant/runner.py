"""Run one external tool with an argv list, log its output, report progress, raise on failure."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from udquant.errors import ToolError
from udquant.progress import StageProgress

logger = logging.getLogger(__name__)

TAIL_LINES = 25
FOLLOW_INTERVAL_S = 0.1
# "[  12/ 109] blk.0.attn_k.weight" (llama-quantize), "[3]1234.5," (perplexity/imatrix chunks),
# "Writing: 45%|" (the converter's tqdm bar).
_STEP = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")
_PERCENT = re.compile(r"(\d{1,3})%\|")
# llama.cpp logs errors as "0.00.017.811 E kl_divergence: ..." (timestamp, level, message).
_ERROR_LINE = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?E (.+)$", re.MULTILINE)


def error_lines(text: str) -> list[str]:
    """The messages of a llama.cpp tool's error-level log lines."""
    return [match.group(1).strip() for match in _ERROR_LINE.finditer(text)]


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
    """Run argv with its merged output going straight to log_path; raise ToolError with the tail on failure.

    The tool writes to the file itself, not to a pipe this process drains: llama.cpp logs from
    a background thread that dies with the process, and a pipe reader competing for the CPU
    made it lose its last lines several times more often (measured: 11 of 30 runs of
    llama-perplexity through a pipe, 3 of 30 into a file, on a loaded 2-core machine).
    The file is followed for progress and for the tail shown on failure.

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
        log.flush()
        with log_path.open("r", encoding="utf-8", errors="replace") as follow, \
                subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=full_env, cwd=cwd) as proc:
            follow.seek(log.tell())
            try:
                returncode = _follow(proc, follow, tail, progress)
            except BaseException:
                proc.kill()
                raise
    if returncode != 0:
        text = "\n".join(tail)
        hint = next((h for needle, h in (hint_for or {}).items() if needle in text), None)
        raise ToolError(stage, tool, returncode, text, log_path, hint=signal_hint(returncode) or hint)


def signal_hint(returncode: int) -> str | None:
    """What a tool's death by a signal (a negative return code) most likely means."""
    # Nothing in the tool's own output says so: "Killed" is what a shell prints, not the process.
    if returncode == -signal.SIGKILL:
        return ("SIGKILL most likely came from the kernel's out-of-memory killer: the machine (or the "
                "container's memory limit) ran out of memory; give it more memory, or close other programs")
    return None


def _follow(proc: subprocess.Popen[bytes], follow: TextIO, tail: deque[str], progress: StageProgress | None) -> int:
    """Read what the tool appends to its log until it exits; its return code."""
    pending = ""
    while True:
        returncode = proc.poll()
        pending += follow.read()
        *lines, pending = pending.split("\n")
        # The file is read with universal newlines: each of tqdm's carriage-return redraws is a line.
        for line in lines:
            if line.strip():
                tail.append(line)
                _report(line, progress)
        if returncode is not None:
            if pending.strip():
                tail.append(pending)
            return returncode
        time.sleep(FOLLOW_INTERVAL_S)
