#!/usr/bin/env bash
# Verify the TensorRT backend on a lent GPU machine (H100/H200), which has PyTorch+CUDA, CuPy,
# cuda-python, ONNX Runtime (CPU), nvcc and Python 3.12, but no TensorRT, no pycuda, no pydantic and
# no internet; one device call carries at most 64 MiB of the working tree, and the TensorRT-RTX libs
# wheel alone is 95 MB. So: download here, split into parts, carry them on consecutive calls into a
# stash on the device, reassemble there, install, build pycuda from its sdist, run the tests.
#
# ---------------------------------------------------------------------------------------------------
# HOW TO USE (three steps; steps 2 and 3 must follow each other closely: a device machine is given
# back about 30 s after a call ends, and the stash in /var/tmp goes with it)
#
# 1. Here (needs pip and the internet; writes only under var/gpucheck/, which .gitignore's "var/" ignores):
#        scripts/gpu_tensorrt_check.sh prepare
#    It prints the exact device calls for steps 2 and 3, with their carry lists (by default:
#    call 1 carries var/gpucheck/call1 = libs part 1 + the pycuda sdist; call 2 carries
#    var/gpucheck/call2 = libs part 2 + the small wheels). Re-running is cheap (pip's cache).
#
# 2. Device call 1 (stashes its parts and builds pycuda meanwhile; ~3-6 min):
#        run(command="bash scripts/gpu_tensorrt_check.sh device 2>&1 | tee $OUT/call1.log",
#            carry=["var/gpucheck/call1"], timeout_s=600)
#
# 3. Device call 2, at once (stashes, reassembles the libs wheel, checks SHA-256, installs, runs
#    pytest tests/test_tensorrt_backend.py and scripts/gpu_tensorrt_timing.py; logs come back in $OUT):
#        run(command="bash scripts/gpu_tensorrt_check.sh device 2>&1 | tee $OUT/call2.log",
#            carry=["var/gpucheck/call2"], timeout_s=600)
#    (It is the same command: "device" stashes what this call carried, then goes as far as the
#    stash allows. If the machine was given back between the calls, it says which parts are
#    missing: run call 1 again, then call 2.) Files back: $OUT/pytest.log, $OUT/timing.log,
#    $OUT/env.log, $OUT/pycuda-build.log, $OUT/junit.xml.
#
# Local self-test of the split and reassembly (no download, no device):  scripts/gpu_tensorrt_check.sh selftest
#
# Knobs (environment): GPUCHECK_STAGE (default var/gpucheck), GPUCHECK_STASH (device, default
# /var/tmp/appliance-gpucheck), GPUCHECK_PART_MIB (default 50), GPUCHECK_CALL_MIB (default 58: what
# one call's folder may hold, leaving room for the working tree), GPUCHECK_PY (device python, default
# python3), GPUCHECK_SKIP_PYTEST=1 (timing only).
# ---------------------------------------------------------------------------------------------------
set -euo pipefail

cd "$(dirname "$0")/.."
STAGE=${GPUCHECK_STAGE:-var/gpucheck}
STASH=${GPUCHECK_STASH:-/var/tmp/appliance-gpucheck}
PART_MIB=${GPUCHECK_PART_MIB:-50}
CALL_MIB=${GPUCHECK_CALL_MIB:-58}
PY=${GPUCHECK_PY:-python3}
TRT_RTX_VERSION=1.7.1.116
PYCUDA_VERSION=2026.1
# Wheels the device lacks for this test (versions as in this project's venv; cp312 for the device).
SMALL_WHEELS=(pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
              typing-extensions==4.16.0 onnxconverter-common==1.16.0 pytools platformdirs mako siphash24
              "tensorrt_rtx_cu13_bindings==$TRT_RTX_VERSION")
PLATFORM_ARGS=(--python-version 3.12 --implementation cp --only-binary=:all:
               --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
MiB=$((1024 * 1024))

say() { printf '%s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# split FILE OUTDIR: FILE -> OUTDIR/NAME.part-000, -001, ... (PART_MIB each) + a line in OUTDIR/SHA256SUMS
split_file() {
    local f=$1 out=$2 name
    name=$(basename "$f")
    split -b "$((PART_MIB * MiB))" -d -a 3 "$f" "$out/$name.part-"
    (cd "$(dirname "$f")" && sha256sum "$name") >>"$out/SHA256SUMS"
}

# pack_calls SRC DST: first-fit the files of SRC into DST/call1, call2, ... of at most CALL_MIB each;
# the pycuda sdist goes into call1 so that the first device call can build it; every call gets SHA256SUMS.
pack_calls() {
    local src=$1 dst=$2 f size n used
    rm -rf "$dst"/call*
    declare -a used_by=()
    local files
    files=$( (ls "$src"/pycuda-*.tar.gz 2>/dev/null; ls -S "$src" | grep -v -e '^SHA256SUMS$' -e '^pycuda-.*\.tar\.gz$' | sed "s|^|$src/|") )
    for f in $files; do
        size=$(stat -c %s "$f")
        [ "$size" -le $((CALL_MIB * MiB)) ] || die "$f is larger than one call ($CALL_MIB MiB): lower GPUCHECK_PART_MIB"
        n=1
        while :; do
            used=${used_by[$n]:-0}
            if [ $((used + size)) -le $((CALL_MIB * MiB)) ]; then break; fi
            n=$((n + 1))
        done
        mkdir -p "$dst/call$n"
        cp "$f" "$dst/call$n/"
        used_by[$n]=$((used + size))
    done
    for d in "$dst"/call*; do cp "$src/SHA256SUMS" "$d/"; done
}

# reassemble DIR: for each line of DIR/SHA256SUMS whose file is split, cat its parts and check the sum.
# Prints the names still missing parts (nothing when complete); returns 1 when something is missing.
reassemble() {
    local dir=$1 sum name missing=0 parts
    [ -f "$dir/SHA256SUMS" ] || { say "no SHA256SUMS in $dir"; return 1; }
    while read -r sum name; do
        if [ -f "$dir/$name" ] && [ "$(sha256sum "$dir/$name" | cut -d' ' -f1)" = "$sum" ]; then continue; fi
        parts=$(ls "$dir/$name".part-* 2>/dev/null || true)
        if [ -z "$parts" ]; then say "missing: $name (no parts here)"; missing=1; continue; fi
        cat $parts >"$dir/$name.tmp"
        if [ "$(sha256sum "$dir/$name.tmp" | cut -d' ' -f1)" != "$sum" ]; then
            rm -f "$dir/$name.tmp"
            say "missing: $name (have $(echo "$parts" | wc -l) part(s), SHA-256 does not match yet: a part is absent)"
            missing=1
            continue
        fi
        mv "$dir/$name.tmp" "$dir/$name"
        say "reassembled $name ($(stat -c %s "$dir/$name") bytes, SHA-256 ok)"
    done <"$dir/SHA256SUMS"
    return $missing
}

cmd_prepare() {
    local dl=$STAGE/dl flat=$STAGE/flat pip=(python3 -m pip)
    [ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
    mkdir -p "$dl"
    say "downloading wheels for the device (Python 3.12, x86-64) into $dl"
    "${pip[@]}" download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$dl" \
        "tensorrt_rtx_cu13_libs==$TRT_RTX_VERSION" "${SMALL_WHEELS[@]}"
    # tensorrt-rtx and tensorrt_rtx_cu13 are sdists (the latter holds the tensorrt_rtx Python package):
    # build them here into pure-Python wheels so the device needs no build step for them.
    "${pip[@]}" wheel -q --no-deps -w "$dl" "tensorrt-rtx==$TRT_RTX_VERSION" "tensorrt_rtx_cu13==$TRT_RTX_VERSION"
    "${pip[@]}" download -q --no-deps --no-binary pycuda -d "$dl" "pycuda==$PYCUDA_VERSION"
    rm -f "$dl"/tensorrt_rtx*.tar.gz
    rm -rf "$flat" && mkdir -p "$flat"
    : >"$flat/SHA256SUMS"
    local f
    for f in "$dl"/*; do
        if [ "$(stat -c %s "$f")" -gt $((PART_MIB * MiB)) ]; then
            split_file "$f" "$flat"
        else
            cp "$f" "$flat/"
            (cd "$dl" && sha256sum "$(basename "$f")") >>"$flat/SHA256SUMS"
        fi
    done
    pack_calls "$flat" "$STAGE"
    local tree
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    say ""
    say "working tree that travels with every call: $((tree / 1024)) KiB (limit per call 64 MiB in all)"
    local n=0 d
    for d in "$STAGE"/call*; do
        n=$((n + 1))
        say "$d: $(du -sb "$d" | cut -f1 | awk '{printf "%.1f MiB", $1/1048576}') -> $(ls "$d" | tr '\n' ' ')"
    done
    say ""
    say "Device calls, one right after the other (same command each time):"
    for d in "$STAGE"/call*; do
        say "  run(command=\"bash scripts/gpu_tensorrt_check.sh device 2>&1 | tee \$OUT/$(basename "$d").log\", carry=[\"$d\"], timeout_s=600)"
    done
}

build_pycuda() {  # device: pycuda wheel from the sdist against this machine's CUDA, into $STASH/built
    local sdist
    sdist=$(ls "$STASH"/pycuda-*.tar.gz 2>/dev/null | head -1)
    [ -n "$sdist" ] || { say "pycuda sdist not stashed yet"; return 1; }
    ls "$STASH"/built/pycuda-*.whl >/dev/null 2>&1 && { say "pycuda wheel already built"; return 0; }
    local cuda_root=/usr/local/cuda src=/tmp/gpucheck-pycuda libdir=/tmp/gpucheck-libcuda real
    [ -x "$cuda_root/bin/nvcc" ] || cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
    # -lcuda needs an unversioned libcuda.so: the toolkit's stub, else a link to the driver's libcuda.so.1.
    mkdir -p "$libdir"
    real=$(ls "$cuda_root"/lib64/stubs/libcuda.so "$cuda_root"/targets/x86_64-linux/lib/stubs/libcuda.so 2>/dev/null | head -1 || true)
    [ -n "$real" ] || real=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
    [ -n "$real" ] || real=$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | head -1 || true)
    [ -n "$real" ] || { say "no libcuda found to link pycuda against"; return 1; }
    ln -sf "$real" "$libdir/libcuda.so"
    rm -rf "$src" && mkdir -p "$src" && tar xzf "$sdist" -C "$src"
    (
        cd "$src"/pycuda-*
        # No CURAND (not needed; its headers may be absent), parallel compile, link against $libdir.
        "$PY" configure.py --cuda-root="$cuda_root" --no-cuda-enable-curand --cudadrv-lib-dir="$libdir" >/dev/null
        printf '\n[build_ext]\nparallel = %s\n' "$(nproc)" >>setup.cfg
        PATH="$cuda_root/bin:$PATH" "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$STASH/built" .
    )
    say "pycuda wheel: $(ls "$STASH"/built/pycuda-*.whl)"
}

cmd_device() {
    local out=${OUT:-/tmp/gpucheck-out} t0=$SECONDS
    mkdir -p "$STASH" "$out"
    local d
    for d in "$STAGE"/call*; do
        [ -d "$d" ] || continue
        say "stashing $d -> $STASH"
        cp -f "$d"/* "$STASH"/
    done
    {
        echo "date: $(date -u)"; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 || true
        "$PY" --version; command -v nvcc && nvcc --version | tail -2; df -h /var/tmp | tail -1
        echo "stash:"; ls -la "$STASH"
    } >"$out/env.log" 2>&1
    # Build pycuda as soon as its sdist is here (call 1), so call 2 has time for the tests.
    if ! ls "$STASH"/built/pycuda-*.whl >/dev/null 2>&1; then
        local bt=$SECONDS
        if build_pycuda >"$out/pycuda-build.log" 2>&1; then
            say "pycuda built in $((SECONDS - bt)) s"
        else
            say "pycuda build FAILED after $((SECONDS - bt)) s (tail of the log follows; whole log in \$OUT/pycuda-build.log)"
            tail -25 "$out/pycuda-build.log" >&2
        fi
    fi
    if ! reassemble "$STASH"; then
        say "not all parts are here yet: this is expected after call 1; run the next call now."
        say "(if this was the last call, the machine was given back in between: run all calls again, quickly)"
        return 0
    fi
    local site=/tmp/gpucheck-site
    rm -rf "$site"
    local wheels
    wheels=$(ls "$STASH"/*.whl "$STASH"/built/pycuda-*.whl 2>/dev/null | grep -v '\.part-' || true)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $wheels
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    "$PY" -c "import tensorrt_rtx as t, pydantic; print('tensorrt_rtx', t.__version__, 'pydantic', pydantic.VERSION)"
    "$PY" -c "import pycuda.driver as c; c.init(); print('pycuda sees', c.Device(0).name())" || say "pycuda is not usable: GPU tests will skip"
    local rc=0
    if [ "${GPUCHECK_SKIP_PYTEST:-0}" != 1 ]; then
        # --rootdir/-c: the project's pytest settings (markers, timeout); -p no:cacheprovider: read-only-safe.
        timeout 300 "$PY" -m pytest tests/test_tensorrt_backend.py -v -rA -s -p no:cacheprovider \
            --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log" >&2 || rc=$?
        say "pytest exit status: $rc"
    fi
    timeout $((560 - (SECONDS - t0) > 30 ? 560 - (SECONDS - t0) : 30)) \
        "$PY" scripts/gpu_tensorrt_timing.py 2>&1 | tee "$out/timing.log" >&2 || say "timing exit status: $?"
    return $rc
}

cmd_selftest() {  # local: split a random 130 MiB file into parts, pack into calls, reassemble in a stash
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    mkdir -p "$tmp/dl" "$tmp/flat" "$tmp/stage" "$tmp/stash"
    head -c $((130 * MiB + 12345)) /dev/urandom >"$tmp/dl/big-1.0-py3-none-any.whl"
    head -c $((3 * MiB)) /dev/urandom >"$tmp/dl/small-1.0-py3-none-any.whl"
    head -c $((2 * MiB)) /dev/urandom >"$tmp/dl/pycuda-2026.1.tar.gz"
    : >"$tmp/flat/SHA256SUMS"
    split_file "$tmp/dl/big-1.0-py3-none-any.whl" "$tmp/flat"
    for f in small-1.0-py3-none-any.whl pycuda-2026.1.tar.gz; do
        cp "$tmp/dl/$f" "$tmp/flat/"; (cd "$tmp/dl" && sha256sum "$f") >>"$tmp/flat/SHA256SUMS"
    done
    pack_calls "$tmp/flat" "$tmp/stage"
    local d ok=1
    for d in "$tmp/stage"/call*; do
        local sz; sz=$(du -sb "$d" | cut -f1)
        say "$(basename "$d"): $((sz / MiB)) MiB: $(ls "$d" | tr '\n' ' ')"
        [ "$sz" -le $((CALL_MIB * MiB + 4096)) ] || { say "FAIL: $d over $CALL_MIB MiB"; ok=0; }
    done
    ls "$tmp/stage/call1/pycuda-2026.1.tar.gz" >/dev/null || { say "FAIL: pycuda sdist not in call1"; ok=0; }
    # Calls arrive one by one: incomplete until the last.
    local calls=("$tmp/stage"/call*) i
    for i in "${!calls[@]}"; do
        cp -f "${calls[$i]}"/* "$tmp/stash/"
        if reassemble "$tmp/stash" 2>/dev/null; then
            [ "$i" -eq $((${#calls[@]} - 1)) ] || { say "FAIL: complete after call $((i + 1)) of ${#calls[@]}"; ok=0; }
        else
            [ "$i" -lt $((${#calls[@]} - 1)) ] || { say "FAIL: incomplete after the last call"; ok=0; }
        fi
    done
    cmp "$tmp/dl/big-1.0-py3-none-any.whl" "$tmp/stash/big-1.0-py3-none-any.whl" || { say "FAIL: reassembled file differs"; ok=0; }
    # A corrupted part must be caught by the SHA-256 check.
    rm -f "$tmp/stash/big-1.0-py3-none-any.whl"
    printf 'X' | dd of="$(ls "$tmp/stash"/big-*.part-* | head -1)" bs=1 seek=100 conv=notrunc 2>/dev/null
    if reassemble "$tmp/stash" 2>/dev/null; then say "FAIL: corrupted part not detected"; ok=0; fi
    [ "$ok" = 1 ] && say "selftest OK (${#calls[@]} calls)" || { say "selftest FAILED"; return 1; }
}

case ${1:-help} in
    prepare) cmd_prepare ;;
    device) cmd_device ;;
    selftest) cmd_selftest ;;
    *) sed -n '2,40p' "$0"; exit 2 ;;
esac
