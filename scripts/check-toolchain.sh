#!/usr/bin/env bash
# Check a llama.cpp toolchain folder before it is cached or used: no library in it carries its own
# copy of libstdc++, and every tool starts. build-toolchain.sh runs it on each new build and
# gpu-smoke.sh on a --toolchain it is given; exit 2 with the reason when a check fails.
#
#   scripts/check-toolchain.sh DIR
#
# Why: a CUDA build on an H200 machine linked libstdc++ statically into libggml-cuda.so (and
# partly into libggml-base.so); llama-quantize and llama-perplexity, which load both, then aborted
# before printing anything ("free(): invalid pointer" in libstdc++'s locale init), while
# llama-imatrix ran. Only starting the tools, or reading their symbols, shows it.
set -euo pipefail

dir="${1:-}"
die() { echo "check-toolchain: $*" >&2; exit 2; }
[ -n "$dir" ] && [ -d "$dir/bin" ] || die "usage: check-toolchain.sh DIR (a folder with bin/ that build-toolchain.sh made)"
# shellcheck source=scripts/llama-cpp-pin.env
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/llama-cpp-pin.env"
read -r -a tools <<<"$LLAMA_CPP_TOOLS"

# A copy of libstdc++ linked into a shared library exports its operator new and locale symbols.
# (No grep -q after a pipe here: it stops reading, and under pipefail the writer's SIGPIPE is a miss.)
if command -v nm >/dev/null; then
  copies=()
  for file in "$dir"/bin/*; do
    [ -f "$file" ] && [ ! -L "$file" ] || continue
    if nm -D --defined-only "$file" 2>/dev/null | grep -E ' (_Znwm|_ZNSt6locale7classicEv)$' >/dev/null; then
      copies+=("$(basename "$file")")
    fi
  done
  [ "${#copies[@]}" = 0 ] || die "libstdc++ is linked statically into ${copies[*]} (look for -static-libstdc++ in \
the compiler's defaults or the build's flags); tools that load two copies of it abort at start"
else
  echo "check-toolchain: nm not found (binutils): the libstdc++ check is skipped, the start check still runs" >&2
fi

# A CUDA build needs libcuda.so.1, which only a machine with the NVIDIA driver has; where it is
# missing, the toolkit's link stub stands in (CUDA then fails to start, and the tools say so).
# Only the stub is added to the loader's path: the CUDA runtime libraries must be found the way
# the tools will be run, or the check would pass a build that later fails with exit 127.
library_path="${LD_LIBRARY_PATH:-}"
cuda_lib=$(find "$dir/bin" -maxdepth 1 -name 'libggml-cuda.so*' ! -type l | head -n 1)
if [ -n "$cuda_lib" ]; then
  candidates=("${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda)
  if command -v nvcc >/dev/null; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
  fi
  cuda_root=/usr/local/cuda
  for candidate in "${candidates[@]}"; do
    if [ -n "$candidate" ] && [ -d "$candidate/lib64" ]; then cuda_root=$candidate; break; fi
  done
  if LD_LIBRARY_PATH="$library_path" ldd "$cuda_lib" | grep 'libcuda.so.1 => not found' >/dev/null; then
    [ -f "$cuda_root/lib64/stubs/libcuda.so" ] || die "no NVIDIA driver here and no CUDA link stub at \
$cuda_root/lib64/stubs/libcuda.so: cannot start the tools to check them"
    stub=$(mktemp -d "${TMPDIR:-/tmp}/udquant-cuda-stub.XXXXXX")
    trap 'rm -rf "$stub"' EXIT
    ln -s "$cuda_root/lib64/stubs/libcuda.so" "$stub/libcuda.so.1"
    library_path="$stub:$library_path"
  fi
fi

# --version: the tools that know it print the build and exit 0, llama-quantize prints its usage
# and exits 1; 124 is a hang, 127 a library the loader did not find, 128 and up a signal.
for tool in "${tools[@]}"; do
  [ -x "$dir/bin/$tool" ] || die "$tool missing from $dir/bin"
  rc=0
  output=$(LD_LIBRARY_PATH="$library_path" timeout 60 "$dir/bin/$tool" --version 2>&1) || rc=$?
  if [ "$rc" -ge 124 ]; then
    die "$tool does not start (exit $rc): $(printf '%s\n' "$output" | tail -n 3)"
  fi
done
echo "check-toolchain: $dir: ${#tools[@]} tools start, no own copy of libstdc++" >&2
