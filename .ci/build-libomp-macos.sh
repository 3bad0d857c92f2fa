#!/usr/bin/env bash
# Builds LLVM's OpenMP runtime (libomp) for the macOS release wheels; run by
# cibuildwheel's before-all step ([tool.cibuildwheel.macos] in pyproject.toml).
#
#   .ci/build-libomp-macos.sh PREFIX
#
# Apple's clang compiles OpenMP (-Xpreprocessor -fopenmp, see setup.py) but
# ships no runtime.  cibuildwheel's documentation advises against Homebrew's
# libomp for wheels: it is built for the runner's own macOS release (so
# delocate refuses it, or the wheel would not load on older systems) and for
# the runner's architecture only.  So this builds libomp from LLVM's sources
# for MACOSX_DEPLOYMENT_TARGET (cibuildwheel sets it before before-all; the
# config sets 11.0) and for both architectures, one build each, merged with
# lipo, and installs it in PREFIX/include and PREFIX/lib.  The wheels' CFLAGS
# and LDFLAGS point there, and delocate-wheel (cibuildwheel's default repair
# step) copies libomp.dylib into each wheel.
#
# Environment:
#   LIBOMP_LLVM_VERSION      LLVM release (default below)
#   LIBOMP_SHA256_OPENMP     SHA-256 of openmp-<version>.src.tar.xz
#   LIBOMP_SHA256_CMAKE      SHA-256 of cmake-<version>.src.tar.xz
#   LIBOMP_ARCHS             architectures (default: "x86_64 arm64")
#
# Not run here: the machine this was written on is Linux without access to
# github.com, so the checksums below are empty and the script stops, printing
# what it downloaded, until a maintainer verifies the tarballs (against the
# release's signatures) and fills them in.  Needs cmake (on GitHub's macOS
# runners) and curl.
set -euo pipefail

prefix="${1:?usage: build-libomp-macos.sh PREFIX}"
version="${LIBOMP_LLVM_VERSION:-20.1.8}"
sha_openmp="${LIBOMP_SHA256_OPENMP:-}"
sha_cmake="${LIBOMP_SHA256_CMAKE:-}"
archs="${LIBOMP_ARCHS:-x86_64 arm64}"
target="${MACOSX_DEPLOYMENT_TARGET:-11.0}"
url="https://github.com/llvm/llvm-project/releases/download/llvmorg-$version"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

fetch() {  # fetch FILE SHA256: download and check, or stop saying what to pin
    curl -fsSL --retry 3 -o "$1" "$url/$1"
    local got
    got="$(shasum -a 256 "$1" | cut -d' ' -f1)"
    if [[ -z "$2" ]]; then
        echo "build-libomp-macos: no checksum pinned for $1 (downloaded: $got);" \
             "verify it and set it in pyproject.toml's [tool.cibuildwheel.macos]" \
             "environment" >&2
        exit 1
    fi
    if [[ "$got" != "$2" ]]; then
        echo "build-libomp-macos: $1 has SHA-256 $got, expected $2" >&2
        exit 1
    fi
}
fetch "openmp-$version.src.tar.xz" "$sha_openmp"
fetch "cmake-$version.src.tar.xz" "$sha_cmake"
tar -xf "openmp-$version.src.tar.xz"
tar -xf "cmake-$version.src.tar.xz"
# the openmp sources look for LLVM's shared CMake modules in a sibling "cmake"
mv "cmake-$version.src" cmake

libs=()
for arch in $archs; do
    case "$arch" in
        x86_64) omp_arch=x86_64 ;;
        arm64) omp_arch=aarch64 ;;
        *) echo "build-libomp-macos: unsupported architecture $arch" >&2; exit 1 ;;
    esac
    cmake -S "openmp-$version.src" -B "build-$arch" \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX="$work/install-$arch" \
        -DCMAKE_OSX_ARCHITECTURES="$arch" \
        -DCMAKE_OSX_DEPLOYMENT_TARGET="$target" \
        -DLIBOMP_ARCH="$omp_arch" \
        -DLIBOMP_INSTALL_ALIASES=OFF \
        -DLIBOMP_OMPD_SUPPORT=OFF \
        -DOPENMP_ENABLE_LIBOMPTARGET=OFF \
        -DLIBOMP_ENABLE_SHARED=ON
    cmake --build "build-$arch" --parallel
    cmake --install "build-$arch"
    libs+=("$work/install-$arch/lib/libomp.dylib")
done

mkdir -p "$prefix/lib" "$prefix/include"
first="${archs%% *}"
cp "$work/install-$first/include/"omp*.h "$prefix/include/"
# one file for both architectures: each wheel links the slice of its own, and
# delocate checks that the library it bundles has the wheel's architecture
lipo -create "${libs[@]}" -output "$prefix/lib/libomp.dylib"
# the install name the extensions record: found through their rpath when
# built, rewritten by delocate to the copy inside the wheel
install_name_tool -id @rpath/libomp.dylib "$prefix/lib/libomp.dylib"
# changing the file voids its ad-hoc signature, without which arm64 macOS
# refuses to load it
codesign --force --sign - "$prefix/lib/libomp.dylib"
lipo -info "$prefix/lib/libomp.dylib"
echo "build-libomp-macos: libomp $version for macOS $target ($archs) in $prefix"
