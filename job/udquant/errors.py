"""The one error hierarchy of udquant. Every error carries a message meant for users.

Library code raises these; only the CLI turns them into messages and exit codes
(see EXIT_CODES in cli.py and the table in the README).
"""

from __future__ import annotations

import signal
from pathlib import Path


class UdquantError(Exception):
    """Root of all errors udquant reports to users."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(UdquantError):
    """The model, repo id, option or file given by the user cannot be used."""

    exit_code = 2


class UnsupportedArchitectureError(InputError):
    def __init__(self, architecture: str, supported: list[str]) -> None:
        super().__init__(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported)}",
            hint="add it to recipes/architectures.yaml once the pinned converter handles it",
        )
        self.architecture = architecture
        self.supported = supported


class RecipeError(InputError):
    """A recipe file is invalid or does not fit the model."""


class ImatrixMismatchError(UdquantError):
    """The importance matrix was made for another model."""

    exit_code = 3

    def __init__(self, message: str, tensors: list[str]) -> None:
        shown = "\n    ".join(tensors[:20])
        more = f"\n    ... and {len(tensors) - 20} more" if len(tensors) > 20 else ""
        super().__init__(
            f"{message}:\n    {shown}{more}",
            hint="use the imatrix of this exact model, or --imatrix compute",
        )
        self.tensors = tensors


class ToolError(UdquantError):
    """A llama.cpp tool or the converter failed."""

    exit_code = 4

    def __init__(self, stage: str, tool: str, returncode: int, stderr_tail: str,
                 log_path: Path | None = None, hint: str | None = None) -> None:
        where = f" (full log: {log_path})" if log_path else ""
        super().__init__(f"{stage}: {tool} {_ending(returncode)}{where}; last output:\n{stderr_tail}", hint=hint)
        self.stage = stage
        self.tool = tool
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.log_path = log_path


def _ending(returncode: int) -> str:
    """How a tool ended: a negative return code is the signal that killed it."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


class VerificationError(UdquantError):
    """The quantized GGUF does not hold the types the recipe asked for."""

    exit_code = 5


class CorruptGGUFError(UdquantError):
    """A GGUF file is truncated, corrupt or not a GGUF file."""

    exit_code = 6

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: not a valid GGUF file: {reason}",
                         hint="check it is the file you meant; a partial download or a killed write leaves such "
                              "files: delete one of those and run again")
        self.path = path


class DiskSpaceError(UdquantError):
    exit_code = 7

    def __init__(self, path: Path, needed: int, free: int) -> None:
        super().__init__(
            f"not enough disk space in {path}: the job needs about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free",
            hint="free some space, or point --work-dir and --out-dir at a larger disk",
        )
        self.needed = needed
        self.free = free


class ToolchainError(UdquantError):
    """The pinned llama.cpp build cannot be found or is not the pinned one."""

    exit_code = 8


class HubError(UdquantError):
    """The Hugging Face Hub refused or failed a request."""

    exit_code = 9
