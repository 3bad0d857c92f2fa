#!/usr/bin/env bash
# Build fastattn's kernels with AddressSanitizer + UndefinedBehaviorSanitizer in
# a temporary copy of this repository and run the test suite against that build.
#
#   tests/sanitize.sh [extra pytest arguments]
#
# Environment:
#   PYTHON        interpreter to build and test with (default: the `python` on
#                 PATH, else python3); needs numpy, Cython, setuptools, pytest
#   KEEP=1        keep the temporary copy (its path is printed)
#   SAN_FLAGS     sanitizer flags (default below)
#   SAN_KEEP_GOING=1  UBSan does not halt and pytest does not stop at the first
#                 failure: lists every report (the exit status is still non-zero)
#
# The repository itself is never built or modified: the working tree (tracked
# files and untracked, non-ignored ones, so uncommitted tests are included) is
# copied to mktemp -d, built there with FASTATTN_EXTRA_CFLAGS, and the tests run
# from there with PYTHONPATH pointing at the copy.  CPython and NumPy are not
# instrumented, so libasan is LD_PRELOADed; leak detection is off (CPython
# leaks by design) and allocator_may_return_null=1 lets the tests' deliberately
# huge allocations fail with MemoryError instead of an ASan abort.  Every
# sanitizer report (from pytest or from any child process it starts) goes to a
# log file; the script exits non-zero if pytest fails or if any report exists.
# If torch cannot be imported under ASan, a stub makes `import torch` raise
# ImportError so that torch-dependent tests skip; the script says so.  The same
# for OpenVINO when it cannot compile a model under ASan.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
SAN_FLAGS="${SAN_FLAGS:--fsanitize=address,undefined -fno-omit-frame-pointer -g}"
CC_BIN="${CC:-gcc}"

log() { printf '[sanitize] %s\n' "$*" >&2; }

LIBASAN="$("$CC_BIN" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
    log "libasan.so not found ($CC_BIN -print-file-name=libasan.so gave '$LIBASAN')"
    exit 2
fi
LIBASAN="$(readlink -f "$LIBASAN")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastattn-sanitize.XXXXXX")"
LOGDIR="$WORK/sanitizer-logs"
mkdir -p "$LOGDIR"
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log "copying $REPO -> $WORK/repo"
mkdir -p "$WORK/repo"
(
    cd "$REPO" || exit 2
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -
) | (cd "$WORK/repo" && tar -xf -) || { log "copy failed"; exit 2; }
cd "$WORK/repo" || exit 2
rm -f fastattn/_kernels/_*.so fastattn/_kernels/_*.c

log "building with FASTATTN_EXTRA_CFLAGS='$SAN_FLAGS' ($PYTHON)"
if ! FASTATTN_EXTRA_CFLAGS="$SAN_FLAGS" "$PYTHON" setup.py build_ext --inplace --force \
        > "$WORK/build.log" 2>&1; then
    tail -50 "$WORK/build.log"
    log "build failed (log above)"
    exit 2
fi
for so in fastattn/_kernels/_*.so; do
    if ! ldd "$so" | grep -q libasan; then
        log "$so is not linked against libasan: the sanitizer flags did not reach the link"
        exit 2
    fi
done
log "built: $(ls fastattn/_kernels/_*.so | tr '\n' ' ')"

export PYTHONPATH="$WORK/repo${PYTHONPATH:+:$PYTHONPATH}"
HALT=1
PYTEST_ARGS=(-q -x -p no:cacheprovider --capture=sys)
if [[ "${SAN_KEEP_GOING:-0}" == 1 ]]; then
    # report every UB site instead of stopping at the first (still exits non-zero)
    HALT=0
    PYTEST_ARGS=(-q -p no:cacheprovider --capture=sys)
fi
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:log_path=$LOGDIR/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=$HALT:log_path=$LOGDIR/ubsan"
export PYTHONFAULTHANDLER=1
export PYTHONDONTWRITEBYTECODE=1
run_san() { LD_PRELOAD="$LIBASAN" "$@"; }

# the copy, not /work/main, must be what is imported
where="$(run_san "$PYTHON" -c 'import fastattn, fastattn._dispatch as d; print(fastattn.__file__); print(d.kernels.__file__)' 2>&1)"
if [[ "$where" != *"$WORK/repo/fastattn/__init__.py"* ]]; then
    log "fastattn is not imported from the copy:"; echo "$where"; exit 2
fi
log "importing: $(echo "$where" | tail -1)"

if ! run_san "$PYTHON" -c 'import torch' > "$WORK/torch-import.log" 2>&1; then
    log "torch does not import under ASan (see below): torch is stubbed out, torch tests skip"
    tail -5 "$WORK/torch-import.log" >&2
    mkdir -p "$WORK/stubs"
    printf 'raise ModuleNotFoundError("torch is disabled under AddressSanitizer (tests/sanitize.sh)")\n' \
        > "$WORK/stubs/torch.py"
    export PYTHONPATH="$WORK/stubs:$PYTHONPATH"
    rm -f "$LOGDIR"/*
else
    log "torch imports under ASan: torch tests included"
fi

# OpenVINO imports, but its runtime throws C++ exceptions while compiling a
# model, which the preloaded ASan runtime cannot intercept (a CHECK failure):
# probed with one tiny model, and stubbed out like torch when it fails
OV_PROBE='import numpy as np, openvino as ov, openvino.opset13 as op
p = op.parameter([2], np.float32)
ov.Core().compile_model(ov.Model([op.relu(p)], [p]), "CPU")'
if ! run_san "$PYTHON" -c "$OV_PROBE" > "$WORK/openvino-import.log" 2>&1; then
    log "OpenVINO does not compile a model under ASan: it is stubbed out, its tests skip"
    mkdir -p "$WORK/stubs"
    printf 'raise ModuleNotFoundError("openvino is disabled under AddressSanitizer (tests/sanitize.sh)")\n' \
        > "$WORK/stubs/openvino.py"
    export PYTHONPATH="$WORK/stubs:$PYTHONPATH"
    rm -f "$LOGDIR"/*
else
    log "OpenVINO compiles under ASan: its tests included"
fi

# --capture=sys: Python-level output is captured as usual, but what the
# sanitizer runtimes write to file descriptor 2 reaches the log directly
log "running: pytest ${PYTEST_ARGS[*]} $*"
start=$SECONDS
run_san "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" "$@" 2>&1 \
    | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
log "pytest exit status $rc after $((SECONDS - start)) s"

# allocator_may_return_null=1 makes ASan warn about each refused huge allocation
# (the tests ask for terabytes on purpose): those warnings are not reports
BENIGN='WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]+ bytes'
reports=()
benign=0
for f in "$LOGDIR"/*; do
    [[ -s "$f" ]] || continue
    if grep -qvE "^==[0-9]+==$BENIGN\$" "$f"; then
        reports+=("$f")
    else
        benign=$((benign + $(wc -l < "$f")))
    fi
done
((benign)) && log "$benign refused huge allocation(s) (expected: the fuzz tests ask for them)"
if ((${#reports[@]})); then
    log "${#reports[@]} sanitizer report(s):"
    for f in "${reports[@]}"; do
        echo "===== $f"
        head -80 "$f"
    done
    exit 1
fi
if grep -qE "runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer" "$WORK/pytest.log"; then
    log "sanitizer reports in the pytest log (distinct sites):"
    grep -E "runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer" "$WORK/pytest.log" \
        | sed -E 's/0x[0-9a-f]+/ADDR/g; s/^[^a-zA-Z=]*//' | sort | uniq -c | sort -rn >&2
    exit 1
fi
log "no sanitizer reports"
exit "$rc"
