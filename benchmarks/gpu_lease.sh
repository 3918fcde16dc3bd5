#!/usr/bin/env bash
# The GPU lease kit (issue 12): what a GPU can prove about this project, in one device call.
#
#   bash benchmarks/gpu_lease.sh --prepare        # on a CPU machine with PyPI: fill .lease/ (git-ignored)
#   bash benchmarks/gpu_lease.sh OUT              # on the GPU machine: the stages below, <= 9 min
#   bash benchmarks/gpu_lease.sh --dry-run OUT    # on a CPU: every stage, tiny configs, interpreted kernels
#
# --prepare puts into .lease/ what the bare GPU image (Python 3.12, torch 2.11, Triton 3.6.0, no network)
# lacks: wheels/ (diffusers and importlib_metadata, which diffusers' metadata requires; the image has every
# other requirement) and triton-cache/ (our kernels compiled for Triton 3.6.0 / sm_90 by
# python -m cmd_kernels.aot --fill-cache, so that none compiles on the GPU). The device call carries ".lease":
#   run(command='bash benchmarks/gpu_lease.sh "$OUT"', carry=[".lease"], timeout_s=600)
#
# The GPU run: stages in priority order, each under its own time limit, all within LEASE_BUDGET_S (540 s)
# from a bare machine. After each stage OUT gets summary.md, lease.json, lease.log and raw.tar.gz anew
# (benchmarks/lease_summary.py), so a run cut short still returns every stage that ended.
#   setup          install .lease/wheels; check the carried Triton cache (cmd_kernels.aot --use-cache), or fill
#                  one here in parallel when it does not fit (timed)
#   env            a. device, driver, torch, Triton; copy bandwidth and bf16 matmul rate measured now
#   kernel_tests   b. pytest tests/cmd_kernels natively, every dtype (bf16 included), CMD_AUTOTUNE=off
#   paper_scale    c. sd21-512x1024 (16x512x1024), bf16, 50 + 50 steps, CFG, batch 1: eager vs cudagraph
#                     per stage and peak memory, output PSNR, the UNet3D baseline at the same size and steps
#   kernel_bench   d. cmd_kernels.bench at sd21-512x1024: each kernel vs eager, attention vs every SDPA backend,
#                     as % of the ceilings measured in env
#   engine_tests   e. pytest -m gpu tests/engine: cudagraph vs eager, no host sync in the loops
#   extra_scaling  f. as time allows: cudagraph at batch 4, 32 and 64 frames
#   extra_compile  f. as time allows: the compile backend against eager
# Tests run with CMD_AUTOTUNE=off; benchmarks with full when the prepared cache is in place, else fast.
# Every Triton cache lookup is logged (benchmarks/lease_cache.py): the summary says which of our kernels
# compiled on the GPU.
#
# Environment: LEASE_PYTHON (python3), LEASE_BUDGET_S (540; dry run 3000), LEASE_WORK (a new /tmp folder),
# LEASE_LIMIT_<stage> (seconds, overrides a stage's limit), LEASE_LIMIT_SCALE (1; dry run 5: times every
# limit), LEASE_BENCH_AUTOTUNE (overrides full/fast), LEASE_FILL_LIMIT (120: the fallback fill's limit).
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
LEASE="$ROOT/.lease"        # travels to the GPU machine (carry)
BUILD="$ROOT/.lease-build"  # stays on the CPU machine: the GPU's Triton wheel, read for its cache keys
PY=${LEASE_PYTHON:-python3}
SITE=${LEASE_SITE:-/tmp/cmd-lease-site}
TINY="tests/engine/tiny_config.json"  # the dry run's config (the engine tests' tiny model)
MIB=$((1 << 20))
TREE_LIMIT=$((64 * MIB))    # what one device call may carry: working tree + .lease
cd "$ROOT" || exit 2

die() { echo "error: $*" >&2; exit 2; }   # bad usage
fail() { echo "error: $*" >&2; exit 1; }  # a step that failed
run() { echo "\$ $*"; "$@"; }  # log the command (lease_summary.py reads the "$ " lines), then run it
note() { "$PY" -m benchmarks.lease_summary note "$WORK/results/$STAGE.json" "$@"; }

# ====================================== the Triton cache fill ======================================
# The ONE place that says how our kernels' Triton cache is filled (python -m cmd_kernels.aot, from the "aot"
# work of issue 12): adjust it here, nowhere else.
#   fill_triton_cache DIR prepare   on the CPU machine, for the GPU image: Triton 3.6.0 (the .venv-t36
#                                   of .ci/run) with the cache keys of the image's cp312 wheel (the keys
#                                   hash libtriton.so, which differs between cp311 and cp312 builds), sm_90
#   fill_triton_cache DIR gpu ARCH  the fallback on the GPU machine when the carried cache does not fit:
#                                   its own Triton, the sd21-512x1024 shapes the benchmarks use, 16 processes
fill_triton_cache() {
    local dir=$1 mode=$2
    if [ ! -f "$ROOT/cmd_kernels/aot.py" ]; then
        echo "error: cmd_kernels/aot.py is missing on this branch: no Triton cache can be filled" >&2
        return 1
    fi
    case $mode in
        prepare)
            bash "$ROOT/.ci/t36-venv" "$ROOT/.venv-t36" || return 1
            local wheel_dir="$BUILD/triton-cp312"
            mkdir -p "$wheel_dir"
            run "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
                -d "$wheel_dir" triton==3.6.0 || return 1
            local wheel
            wheel=$(ls "$wheel_dir"/triton-3.6.0-cp312-*.whl 2>/dev/null | head -n 1)
            [ -n "$wheel" ] || { echo "error: no triton 3.6.0 cp312 wheel in $wheel_dir" >&2; return 1; }
            run env -u TRITON_INTERPRET "$ROOT/.venv-t36/bin/python" -m cmd_kernels.aot --fill-cache "$dir" --arch 90 \
                --jobs "$(nproc)" --triton-key-from "$wheel"
            ;;
        gpu)
            run env -u TRITON_INTERPRET -u TRITON_CACHE_MANAGER -u CMD_LEASE_CACHE_LOG "$PY" -m cmd_kernels.aot \
                --fill-cache "$dir" --arch "$3" --config sd21-512x1024 --jobs 16
            ;;
        *) echo "error: fill_triton_cache: unknown mode $mode" >&2; return 2 ;;
    esac
    local rc=$?
    # cmd_kernels.aot also checks what it compiled (spills, tensor cores, vector loads) and exits 1 on a finding;
    # the cache is filled all the same once it has written its manifest.
    if [ -f "$dir/cmd-aot-manifest.json" ]; then
        ((rc == 0)) || echo "warning: cmd_kernels.aot exited $rc: its compile check reported problems (above); the cache is filled"
        return 0
    fi
    return $((rc ? rc : 1))
}
# ===================================================================================================

usage() { sed -n '2,6p' "$SELF" | sed 's/^# \{0,1\}//'; }

tree_bytes() {  # what a device call sends without carry: tracked and untracked-not-ignored files
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && du -cb --files0-from=- 2>/dev/null) \
        | tail -n 1 | cut -f1
}

prepare() {
    local version
    version=$("$PY" -c 'from importlib.metadata import version; print(version("diffusers"))') \
        || fail "diffusers is not installed here: install the project first (README), the lease carries the same version"
    mkdir -p "$LEASE/wheels" "$BUILD" || fail "cannot create $LEASE"
    rm -f "$LEASE"/wheels/*.whl
    # What the GPU image lacks (its package list: the device tool's KINDS.md): diffusers; of diffusers'
    # requirements only importlib_metadata (8.7.0 needs just zipp, which the image has; newer ones add
    # lazy-importer). Pure-Python wheels; --python-version etc. make pip pick what Python 3.12 installs.
    run "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$LEASE/wheels" \
        "diffusers==$version" importlib_metadata==8.7.0 || fail "pip download failed"
    rm -rf "$LEASE/triton-cache.new"
    local t0=$SECONDS
    fill_triton_cache "$LEASE/triton-cache.new" prepare \
        || fail "the Triton cache fill failed (see above): .lease/ has the wheels but no cache; a lease would compile every kernel on the GPU"
    rm -rf "$LEASE/triton-cache" && mv "$LEASE/triton-cache.new" "$LEASE/triton-cache"
    local lease_bytes tree
    lease_bytes=$(du -sb "$LEASE" | cut -f1)
    tree=$(tree_bytes)
    echo "filled .lease in $((SECONDS - t0)) s: $(ls "$LEASE/wheels" | tr '\n' ' ')+ triton-cache ($(ls "$LEASE/triton-cache" | wc -l) entries)"
    echo "size: .lease $((lease_bytes / MIB)) MiB + working tree $((tree / MIB)) MiB (a device call carries at most 64 MiB)"
    if (( lease_bytes + tree > TREE_LIMIT )); then
        fail ".lease ($lease_bytes bytes) and the working tree ($tree bytes) exceed the 64 MiB a device call carries"
    fi
    echo "next, the device call: run(command='bash benchmarks/gpu_lease.sh \"\$OUT\"', carry=['.lease'], timeout_s=600)"
}

# ---------------------------------------------------------------------------------------------- stages
# Each stage_NAME runs in its own process (bash "$SELF" __stage NAME) under timeout; its output is the log.

stage_setup() {
    if (( DRY )); then
        note wheels='"none: dry run (this machine has its packages)"'
    else
        local wheels=("$LEASE"/wheels/*.whl)
        if [ -e "${wheels[0]}" ]; then
            run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "${wheels[@]}"
            local pip_rc=$?
            note wheels_rc=$pip_rc wheels="$("$PY" -c 'import json, os, sys; print(json.dumps([os.path.basename(w) for w in sys.argv[1:]]))' \
                "${wheels[@]}")"
        else
            note wheels='"none: no .lease/wheels (run bash benchmarks/gpu_lease.sh --prepare on a CPU machine)"'
        fi
    fi
    run "$PY" -m benchmarks.lease_env requirements diffusers --json "$WORK/results/requirements.json"
    note requirements="$(cat "$WORK/results/requirements.json" 2>/dev/null || echo null)"

    mkdir -p "$TRITON_CACHE_DIR"
    if (( DRY )); then
        note cache_check='"skipped: dry run (interpreted kernels compile nothing)"' cache_fits=null carried_entries=0
    elif [ ! -f "$ROOT/cmd_kernels/aot.py" ]; then
        note cache_check='"cmd_kernels/aot.py is missing on this branch: no cache check or fill; every kernel compiles here"' \
            cache_fits=false carried_entries=0
    else
        if [ -d "$LEASE/triton-cache" ]; then
            cp -a "$LEASE/triton-cache/." "$TRITON_CACHE_DIR/"
        fi
        note carried_entries="$(find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l)"
        local msg rc
        echo "\$ $PY -m cmd_kernels.aot --use-cache $TRITON_CACHE_DIR"
        msg=$(env -u TRITON_CACHE_MANAGER -u CMD_LEASE_CACHE_LOG timeout 90 "$PY" -m cmd_kernels.aot --use-cache "$TRITON_CACHE_DIR" 2>&1)
        rc=$?
        echo "$msg"
        note cache_check="$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1].strip()[-600:]))' "$msg")"
        if (( rc == 0 )); then
            note cache_fits=true
        else
            note cache_fits=false
            local arch t0=$SECONDS
            arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
            [ -n "$arch" ] || arch=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)')
            timeout -k 10 "${LEASE_FILL_LIMIT:-120}" bash "$SELF" __fill "$TRITON_CACHE_DIR" gpu "$arch"
            rc=$?
            note fill_rc=$rc fill_seconds=$((SECONDS - t0)) \
                entries_after_fill="$(find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l)"
        fi
    fi
    # The entries there before any stage: a hit of one of these is a kernel that did not compile in a stage.
    find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' > "$WORK/results/carried-entries.txt"
}

stage_env() {
    run "$PY" -m benchmarks.lease_env env --json "$WORK/results/env.json"
}

xdist() {  # -n N where pytest-xdist is installed (the GPU image has it), nothing otherwise
    if "$PY" -c 'import xdist' 2>/dev/null; then echo "-n $1"; fi
}

stage_kernel_tests() {
    local select=(tests/cmd_kernels)
    if (( DRY )); then select=(tests/cmd_kernels/test_content_frame.py -k native_blocks); fi
    # Natively on a GPU every test runs compiled: fp32 and fp16 too, not only the bf16 ones marked gpu.
    # shellcheck disable=SC2046
    run "$PY" -m pytest -q -p no:cacheprovider -rfE $(xdist 8) --junitxml "$WORK/results/$STAGE.xml" "${select[@]}"
}

paper_scale() {  # paper_scale NAME ARGS...: benchmarks/paper_scale.py, full size on the GPU, tiny in the dry run
    local name=$1
    shift
    local size=(--config sd21-512x1024 --device cuda --dtype bfloat16 --steps 50 --repeats 2 --warmup 1)
    if (( DRY )); then
        size=(--config "$TINY" --device cpu --dtype float32 --steps 1 --repeats 1 --warmup 0 --baseline-size tiny)
    fi
    run "$PY" benchmarks/paper_scale.py "${size[@]}" "$@" --out "$WORK/results" --name "$name"
}

stage_paper_scale() {
    paper_scale "$STAGE" --backends eager,cudagraph --batch-sizes 1 --no-scaling
}

stage_kernel_bench() {
    local config=sd21-512x1024 ceilings=()
    if (( DRY )); then config=$TINY; fi
    # The ceilings env measured; where env did not end, cmd_kernels.bench measures its own.
    if [ -f "$WORK/results/env.json" ]; then ceilings=(--ceilings "$WORK/results/env.json"); fi
    run "$PY" -m cmd_kernels.bench --configs "$config" --no-compile "${ceilings[@]}" --json "$WORK/results/$STAGE.json"
}

stage_engine_tests() {
    local select=(tests/engine)
    if (( DRY )); then select=(tests/engine/test_backends.py); fi  # where they are: less to import on a CPU
    # shellcheck disable=SC2046
    run "$PY" -m pytest -q -p no:cacheprovider -rfE -m gpu $(xdist 3) --junitxml "$WORK/results/$STAGE.xml" "${select[@]}"
}

stage_extra_scaling() {
    local frames=32,64 batch=4
    if (( DRY )); then frames=8; batch=2; fi
    paper_scale "$STAGE" --skip-baseline --backends cudagraph,eager --batch-sizes "$batch" --frames "$frames"
}

stage_extra_compile() {
    paper_scale "$STAGE" --skip-baseline --backends eager,compile --batch-sizes 1 --no-scaling
}

# ---------------------------------------------------------------------------------------------- driver

collect() {
    "$PY" -m benchmarks.lease_summary collect --work "$WORK" --out "$OUT" --command "$COMMAND" \
        --budget-s "$BUDGET_S" --elapsed-s "$((SECONDS - START))" $( ((DRY)) && echo --dry-run) \
        || echo "[lease] collect failed (exit $?): the logs are in $WORK/logs"
}

run_stage() {  # run_stage NAME KIND LIMIT AUTOTUNE
    local name=$1 kind=$2 limit=$3 tune=$4
    local override="LEASE_LIMIT_$name"
    limit=${!override:-$((limit * LIMIT_SCALE))}
    local left=$((DEADLINE - SECONDS - 10))  # 10 s stay for the last collect
    ((left < limit)) && limit=$left
    if ((left < 15)); then
        printf '%s\t%s\tskipped\t-\t0\t%s\t%s\n' "$name" "$kind" "$limit" "$tune" >> "$WORK/stages.tsv"
        echo "[lease] $name: not run, $left s left"
        collect
        return
    fi
    local t0=$SECONDS rc status
    echo "[lease] $name: limit $limit s, CMD_AUTOTUNE=$tune"
    # SIGINT first: pytest then still writes its JUnit XML; KILL 15 s later if anything is left.
    CMD_LEASE_STAGE=$name CMD_AUTOTUNE=${tune/#-/off} timeout -s INT -k 15 "$limit" \
        bash "$SELF" __stage "$name" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$tune" \
        >> "$WORK/stages.tsv"
    echo "[lease] $name: $status (exit $rc) in $((SECONDS - t0)) s"
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/    /'
    collect
}

lease() {
    OUT=$1
    mkdir -p "$OUT" || die "cannot create the output folder $OUT"
    OUT=$(cd "$OUT" && pwd)
    WORK=${LEASE_WORK:-$(mktemp -d /tmp/cmd-lease.XXXXXX)}
    mkdir -p "$WORK/logs" "$WORK/results" || die "cannot create the work folder $WORK"
    : > "$WORK/stages.tsv"
    COMMAND="bash benchmarks/gpu_lease.sh $( ((DRY)) && echo '--dry-run ')OUT"
    BUDGET_S=${LEASE_BUDGET_S:-$( ((DRY)) && echo 3000 || echo 540)}
    # The limits are the GPU's; a dry run on a (shared, 2-core) CPU gets 5 times each, to check the plumbing.
    LIMIT_SCALE=${LEASE_LIMIT_SCALE:-$( ((DRY)) && echo 5 || echo 1)}
    START=$SECONDS
    DEADLINE=$((START + BUDGET_S))
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export TRITON_CACHE_DIR="$WORK/triton-cache"
    export TRITON_CACHE_MANAGER=benchmarks.lease_cache:CountingCacheManager CMD_LEASE_CACHE_LOG="$WORK/cache.log"
    export DRY WORK PY SITE LEASE ROOT
    if ((DRY)); then
        export TRITON_INTERPRET=1  # the kernels run in Triton's interpreter, the engine calls them there too
    fi
    echo "[lease] $COMMAND: work folder $WORK, results in $OUT, budget $BUDGET_S s"

    run_stage setup setup 150 -
    run_stage env env 45 -
    run_stage kernel_tests pytest 110 off
    local bench=${LEASE_BENCH_AUTOTUNE:-}
    if [ -z "$bench" ]; then  # full (best kernels) when every config is already compiled, fast otherwise
        bench=$("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))
print("full" if d.get("cache_fits") is True or d.get("fill_rc") == 0 else "fast")' "$WORK/results/setup.json" 2>/dev/null \
            || echo fast)
    fi
    run_stage paper_scale paper_scale 200 "$bench"
    run_stage kernel_bench kernel_bench 130 "$bench"
    run_stage engine_tests pytest 75 off
    run_stage extra_scaling paper_scale 150 "$bench"
    run_stage extra_compile paper_scale 300 "$bench"
    collect
    echo "[lease] done in $((SECONDS - START)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
    cat "$OUT/summary.md" 2>/dev/null
}

case "${1:-}" in
    --prepare)
        (($# == 1)) || die "--prepare takes no other argument"
        prepare
        ;;
    --dry-run)
        (($# == 2)) || die "usage: bash benchmarks/gpu_lease.sh --dry-run OUT"
        DRY=1
        lease "$2"
        ;;
    __fill)  # internal: fill_triton_cache DIR MODE [ARCH] in its own process (under timeout)
        shift
        fill_triton_cache "$@"
        ;;
    __stage)  # internal: one stage's body, in its own process (run_stage)
        STAGE=$2
        declare -F "stage_$STAGE" > /dev/null || die "unknown stage $STAGE"
        "stage_$STAGE"
        ;;
    -h | --help)
        usage
        ;;
    "" | -*)
        usage >&2
        die "expected OUT, --dry-run OUT or --prepare, got '${1:-}'"
        ;;
    *)
        (($# == 1)) || die "usage: bash benchmarks/gpu_lease.sh OUT"
        DRY=0
        lease "$1"
        ;;
esac
