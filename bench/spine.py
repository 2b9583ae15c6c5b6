"""Benchmark: udquant-job against the raw llama.cpp commands it runs, on one tiny model.

Both sides do the same work (convert to BF16, compute an imatrix, quantize with the same
per-tensor types), from scratch, several times, interleaved. Prints medians, the
wall-time ratio (target <= 1.05), peak RSS of the process tree and peak disk use.

    python bench/spine.py [--runs 5] [--layers 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from udquant.gguf_header import read_gguf_header
from udquant.library import data_file
from udquant.recipe import find_recipe, plan_quantization
from udquant.tiny_model import TinySpec, make_tiny_model
from udquant.toolchain import find_toolchain

CHUNKS, CONTEXT = "16", "128"


def folder_bytes(folder: Path) -> int:
    """Bytes on disk under folder, each hard-linked file counted once."""
    sizes = {}
    for path in folder.rglob("*"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # renamed while we looked
            continue
        if path.is_file():
            sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(sizes.values())


class Peaks:
    """Poll a process tree's resident memory and a folder's size while a command runs."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.rss, self.disk = folder, 0, 0

    def run(self, argv: list[str]) -> None:
        proc = psutil.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    tree = [proc, *proc.children(recursive=True)]
                    self.rss = max(self.rss, sum(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass
                self.disk = max(self.disk, folder_bytes(self.folder))
                stop.wait(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
        if code != 0:
            raise SystemExit(f"benchmark command failed ({code}): {' '.join(argv)}")


def raw_commands(model: Path, work: Path, tensor_types: Path) -> list[list[str]]:
    toolchain = find_toolchain()
    bf16, imatrix, out = work / "bf16.gguf", work / "imatrix.gguf", work / "out.gguf"
    return [
        [sys.executable, str(toolchain.converter), str(model), "--outtype", "bf16", "--outfile", str(bf16)],
        [str(toolchain.tool("llama-imatrix")), "-m", str(bf16), "-f", str(data_file("calibration.txt")),
         "-o", str(imatrix), "--output-format", "gguf", "-c", CONTEXT, "--chunks", CHUNKS, "--no-ppl"],
        [str(toolchain.tool("llama-quantize")), "--tensor-type-file", str(tensor_types), "--imatrix",
         str(imatrix), str(bf16), str(out), "Q5_K_M"],
    ]


def timed(commands: list[list[str]], work: Path) -> tuple[float, int, int]:
    work.mkdir(parents=True)
    peaks = Peaks(work)
    start = time.perf_counter()
    for argv in commands:
        peaks.run(argv)
    return time.perf_counter() - start, peaks.rss, peaks.disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="udquant-bench-"))
    try:
        model = make_tiny_model(root / "bench-model", TinySpec(num_layers=args.layers, hidden_size=512,
                                                               intermediate_size=1536))
        # The same explicit types udquant will use, prepared outside the timed part.
        subprocess.run([sys.executable, str(find_toolchain().converter), str(model), "--outtype", "bf16",
                        "--outfile", str(root / "header.gguf")], check=True, capture_output=True)
        plan = plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), read_gguf_header(root / "header.gguf"))
        tensor_types = root / "tensor-types.txt"
        tensor_types.write_text("\n".join(plan.tensor_type_lines()) + "\n")
        job_bin = str(Path(sys.executable).parent / "udquant-job")
        raw, job = [], []
        for run in range(args.runs):
            raw.append(timed(raw_commands(model, root / f"raw-{run}", tensor_types), root / f"raw-{run}"))
            work = root / f"job-{run}"
            job.append(timed([[job_bin, str(model), "--work-dir", str(work / "work"), "--out-dir",
                               str(work / "out"), "--imatrix-chunks", CHUNKS, "--imatrix-context", CONTEXT,
                               "--disk-reserve-gb", "0"]], work))
        med = {name: [statistics.median(r[i] for r in rows) for i in range(3)] for name, rows in
               (("raw", raw), ("udquant-job", job))}
        print(f"model: {args.layers} layers, {model.name}; {args.runs} runs each, medians")
        print(f"{'':12} {'wall s':>8} {'peak RSS MB':>12} {'peak disk MB':>13}")
        for name, (wall, rss, disk) in med.items():
            print(f"{name:12} {wall:8.2f} {rss / 1e6:12.0f} {disk / 1e6:13.1f}")
        print(f"wall-time ratio udquant-job / raw: {med['udquant-job'][0] / med['raw'][0]:.3f} (target <= 1.05)")
        print(f"peak RSS ratio: {med['udquant-job'][1] / med['raw'][1]:.3f}; "
              f"peak disk ratio: {med['udquant-job'][2] / med['raw'][2]:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
