#!/usr/bin/env bash
# Check in a second, before a build of minutes, that a C++ compiler links shared libraries against
# the shared libstdc++. build-toolchain.sh runs it on the compilers CMake chose for a shared (CUDA)
# build; exit 2 with what the compiler says about itself when it does not.
#
#   scripts/check-compiler.sh CXX [CXX ...]
#
# Why: on a GPU machine, a CUDA build linked libstdc++ statically into its shared libraries, and
# the tools that loaded two of them aborted at start (see check-toolchain.sh, which checks the
# finished build). Whatever makes a compiler do that (a specs file, a missing libstdc++.so, a
# wrapper's flags), a one-file library shows it.
set -euo pipefail

die() { echo "check-compiler: $*" >&2; exit 2; }
[ $# -gt 0 ] || die "usage: check-compiler.sh CXX [CXX ...]"
if ! command -v readelf >/dev/null; then
  echo "check-compiler: readelf not found (binutils): not checked" >&2
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/udquant-compiler.XXXXXX")
trap 'rm -rf "$work"' EXIT
# std::string and std::cout: operator new and the locale, what a copy of libstdc++ brings along.
cat >"$work/probe.cpp" <<'CPP'
#include <iostream>
#include <string>
extern "C" int probe(const char* text) { std::string copy(text); std::cout << copy; return (int)copy.size(); }
CPP

for cxx in "$@"; do
  command -v "$cxx" >/dev/null || die "compiler not found: $cxx"
  "$cxx" -shared -fPIC "$work/probe.cpp" -o "$work/libprobe.so" >"$work/link.log" 2>&1 \
    || die "$cxx cannot link a shared library: $(tail -n 3 "$work/link.log")"
  if ! readelf -d "$work/libprobe.so" | grep -F '[libstdc++.so.6]' >/dev/null; then
    found=$("$cxx" -print-file-name=libstdc++.so 2>/dev/null || true)
    specs=no
    if "$cxx" -dumpspecs 2>/dev/null | grep -F -- '-static-libstdc++' >/dev/null; then specs=yes; fi
    die "$cxx links libstdc++ statically into shared libraries, so the CUDA build's tools would abort \
at start. What it says: version $("$cxx" -dumpfullversion 2>/dev/null || echo unknown); \
libstdc++.so found at: $found (a bare name means none: install the libstdc++ -dev package of this \
compiler); -static-libstdc++ in its specs: $specs; resolved path: $(readlink -f "$(command -v "$cxx")")"
  fi
done
echo "check-compiler: $* link libstdc++ as a shared library" >&2
