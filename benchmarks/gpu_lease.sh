#!/usr/bin/env bash
# The GPU lease kit (issue 12): what a GPU can prove about this project, in one device call.
#
#   bash benchmarks/gpu_lease.sh --prepare        # on a CPU machine with PyPI: fill .lease/ (git-ignored)
#   bash benchmarks/gpu_lease.sh OUT              # on the GPU machine: the stages below, <= 9 min
#   bash benchmarks/gpu_lease.sh --dry-run OUT    # on a CPU: every stage, tiny configs, interpreted kernels
#   bash benchmarks/gpu_lease.sh --plan           # the stages, their limits and their sum against the budget
#   bash benchmarks/gpu_lease.sh --rehearse [OUT] # on a CPU: the GPU image's versions (.ci/gpu-image-venv), then
#                                                 # the kernel, engine and export tests and the dry run with them
#
# --prepare puts into .lease/ what the bare GPU image (Python 3.12, torch 2.11, Triton 3.6.0, no network)
# lacks: wheels/ (diffusers and importlib_metadata, which diffusers' metadata requires; the image has every
# other requirement) and triton-cache/ (our kernels compiled for Triton 3.6.0 / sm_90 by
# python -m cmd_kernels.aot --fill-cache, so that none compiles on the GPU). The device call carries ".lease":
#   run(command='bash benchmarks/gpu_lease.sh "$OUT"', carry=[".lease"], timeout_s=600)
#
# The GPU run: stages in priority order (STAGE_PLAN below: the never-run correctness tests first), each
# under its own time limit; the limits add up to LEASE_BUDGET_S (540 s) from a bare machine. After each
# stage OUT gets summary.md, lease.json, lease.log and raw.tar.gz anew (benchmarks/lease_summary.py), so a
# run cut short still returns every stage that ended.
#   setup          install .lease/wheels and check the requirements (fails, and the stages that import the
#                  engine are skipped, when the wheels are missing or a requirement is unmet); time Triton's
#                  launcher stubs (built with gcc at first launch); check the carried Triton cache
#                  (cmd_kernels.aot --use-cache), or fill one here for what is left of the stage
#   env            a. device, driver, torch, Triton; copy bandwidth and bf16 matmul rate measured now
#   engine_tests   e. pytest -m gpu tests/engine: cudagraph vs eager, no host sync in the loops (never run yet)
#   kernel_tests   b. pytest tests/cmd_kernels natively, every dtype (bf16 included), CMD_AUTOTUNE=off; the
#                     CPU-only ahead-of-time compile tests (marker aot) are left to CI
#   paper_scale    c. sd21-512x1024 (16x512x1024), bf16, 50 + 50 steps, CFG, batch 1: eager vs cudagraph
#                     per stage and peak memory, output PSNR, the UNet3D baseline at the same size and steps
#   kernel_bench   d. cmd_kernels.bench at sd21-512x1024: each kernel vs eager, attention vs every SDPA backend,
#                     as % of the ceilings measured in env
#   extra_scaling  f. as time allows: cudagraph at batch 4, 32 and 64 frames (the image VAE is not measured again)
#   extra_compile  f. only when LEASE_STAGES names it: the compile backend against eager (inductor at SD scale
#                     needs minutes: it does not fit the budget with the rest)
# Tests run with CMD_AUTOTUNE=off; benchmarks with full when the prepared cache is in place, else fast.
# Every Triton cache lookup is logged (benchmarks/lease_cache.py): the summary says which of our kernels
# compiled on the GPU. --prepare also records the checkout's revision in .lease/revision.json (the device
# machine gets the tree without .git): every result's git_rev comes from it there.
#
# Environment: LEASE_PYTHON (python3), LEASE_BUDGET_S (540; dry run 3000), LEASE_WORK (a new /tmp folder),
# LEASE_STAGES (comma-separated stage names, default: the plan's default stages), LEASE_LIMIT_<stage>
# (seconds, overrides a stage's limit), LEASE_LIMIT_SCALE (1; dry run 5: times every limit),
# LEASE_BENCH_AUTOTUNE (overrides full/fast), LEASE_FILL_LIMIT (seconds for the fallback fill; default
# what is left of setup's limit).
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

usage() { sed -n '2,9p' "$SELF" | sed 's/^# \{0,1\}//'; }

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
    run "$PY" -c 'from cmd_kernels.measure import write_revision; r = write_revision(); print("revision", r["rev"], "dirty" if r["dirty"] else "clean")' \
        || fail "cannot record the revision in .lease/revision.json (not a git checkout?)"
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

# ------------------------------------------------------------------------------------------ stage plan
# name, kind (lease_summary's reader), limit on the GPU (s), CMD_AUTOTUNE (- none, off, bench: full or fast
# as the cache allows), needs (engine: skipped when setup failed), default (1: runs unless LEASE_STAGES says).
# The order is the priority; the default stages' limits add up to at most the 540 s budget (--plan checks).
STAGE_PLAN=(
    "setup         setup         60  -     none   1"
    "env           env           30  -     none   1"
    "engine_tests  pytest        75  off   engine 1"
    "kernel_tests  pytest        90  off   none   1"
    "paper_scale   paper_scale   160 bench engine 1"
    "kernel_bench  kernel_bench  80  bench none   1"
    "extra_scaling paper_scale   45  bench engine 1"
    "extra_compile paper_scale   300 bench engine 0"
)
GPU_BUDGET_S=540

plan() {  # the stages a run would take, and whether the default ones fit the budget
    local total=0 line name kind limit tune needs default
    printf '%-14s %-13s %7s  %-8s %-7s %s\n' stage kind limit_s autotune needs default
    for line in "${STAGE_PLAN[@]}"; do
        read -r name kind limit tune needs default <<< "$line"
        printf '%-14s %-13s %7s  %-8s %-7s %s\n' "$name" "$kind" "$limit" "$tune" "$needs" "$default"
        ((default)) && total=$((total + limit))
    done
    echo "default stages: $total s of the $GPU_BUDGET_S s budget"
    ((total <= GPU_BUDGET_S)) || { echo "error: the default stages' limits exceed the budget" >&2; return 1; }
}

# ---------------------------------------------------------------------------------------------- stages
# Each stage_NAME runs in its own process (bash "$SELF" __stage NAME) under timeout; its output is the log.

stage_setup() {
    local failed=0
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
            ((pip_rc == 0)) || { echo "error: installing the carried wheels failed (exit $pip_rc)"; failed=1; }
        else
            note wheels='"none: no .lease/wheels (run bash benchmarks/gpu_lease.sh --prepare on a CPU machine)"'
            echo "error: no .lease/wheels: run bash benchmarks/gpu_lease.sh --prepare on a CPU machine, carry .lease"
            failed=1
        fi
    fi
    run "$PY" -m benchmarks.lease_env requirements diffusers --json "$WORK/results/requirements.json" \
        || { echo "error: the engine's requirements are not met here (above): its stages are skipped"; failed=1; }
    note requirements="$(cat "$WORK/results/requirements.json" 2>/dev/null || echo null)"
    note revision="$("$PY" -c 'import json; from cmd_kernels.measure import git_rev; print(json.dumps(git_rev()))')"

    mkdir -p "$TRITON_CACHE_DIR"
    if (( DRY )); then
        note cache_check='"skipped: dry run (interpreted kernels compile nothing)"' cache_fits=null carried_entries=0
    else
        setup_cache
    fi
    # The entries there before any stage: a hit of one of these is a kernel that did not compile in a stage.
    find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' > "$WORK/results/carried-entries.txt"
    return $failed
}

launcher_stubs() {  # Triton's launcher stubs (cuda_utils, the kernel launcher) build with gcc at first launch
    local t0=$SECONDS
    run env -u TRITON_CACHE_MANAGER -u CMD_LEASE_CACHE_LOG timeout 60 "$PY" -m benchmarks.launcher_stubs
    note launcher_stubs_rc=$? launcher_stubs_s=$((SECONDS - t0))
}

setup_cache() {  # copy the carried cache in and check it; fill the rest of setup's time where it does not fit
    if ! command -v nvidia-smi > /dev/null; then
        note cache_check='"skipped: no GPU here (no nvidia-smi)"' cache_fits=null carried_entries=0
        return
    fi
    launcher_stubs
    if [ ! -f "$ROOT/cmd_kernels/aot.py" ]; then
        note cache_check='"cmd_kernels/aot.py is missing on this branch: no cache check or fill; every kernel compiles here"' \
            cache_fits=false carried_entries=0
        return
    fi
    if [ -d "$LEASE/triton-cache" ]; then
        cp -a "$LEASE/triton-cache/." "$TRITON_CACHE_DIR/"
    fi
    note carried_entries="$(find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l)"
    local msg rc
    echo "\$ $PY -m cmd_kernels.aot --use-cache $TRITON_CACHE_DIR"
    msg=$(env -u TRITON_CACHE_MANAGER -u CMD_LEASE_CACHE_LOG timeout 30 "$PY" -m cmd_kernels.aot --use-cache "$TRITON_CACHE_DIR" 2>&1)
    rc=$?
    echo "$msg"
    note cache_check="$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1].strip()[-600:]))' "$msg")"
    if (( rc == 0 )); then
        note cache_fits=true
        return
    fi
    note cache_fits=false
    local arch t0=$SECONDS fill_limit=${LEASE_FILL_LIMIT:-$((STAGE_DEADLINE - SECONDS - 5))}
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    [ -n "$arch" ] || arch=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)' 2>/dev/null)
    if [ -z "$arch" ]; then
        note fill_rc=null fill_seconds=0 fill='"no CUDA device: nothing to fill for"'
        return
    fi
    if ((fill_limit < 10)); then
        note fill_rc=null fill_seconds=0 fill='"no time left in setup: the kernels compile in the stages"'
        return
    fi
    timeout -k 5 "$fill_limit" bash "$SELF" __fill "$TRITON_CACHE_DIR" gpu "$arch"
    rc=$?
    note fill_rc=$rc fill_seconds=$((SECONDS - t0)) \
        entries_after_fill="$(find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l)"
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
    # Natively on a GPU every test runs compiled: fp32 and fp16 too, not only the bf16 ones marked gpu. The
    # ahead-of-time compile tests (marker aot) need no GPU and compete with the native compiles: CI runs them.
    # shellcheck disable=SC2046
    run "$PY" -m pytest -q -p no:cacheprovider -rfE -m "not aot" $(xdist 8) --junitxml "$WORK/results/$STAGE.xml" \
        "${select[@]}"
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
    paper_scale "$STAGE" --skip-baseline --skip-vae --backends cudagraph,eager --batch-sizes "$batch" --frames "$frames"
}

stage_extra_compile() {
    paper_scale "$STAGE" --skip-baseline --skip-vae --backends eager,compile --batch-sizes 1 --no-scaling
}

# ------------------------------------------------------------------------------------------- rehearsal
# The GPU image's versions on this CPU (.ci/gpu-image-venv: torch 2.11.0, Triton 3.6.0, transformers 5.17), so an
# import or API difference fails here and not in the only minutes of GPU we may get. Steps (REHEARSE_STEPS,
# comma-separated, default all): kernel_tests, engine_tests (tests/engine), export_tests (tests/export),
# dry_run (this script's --dry-run with that Python). REHEARSE_VENV: the venv (default .venv-gpu-image).
rehearse() {
    local out=${1:-$(mktemp -d /tmp/cmd-rehearse.XXXXXX)}
    mkdir -p "$out" || die "cannot create the output folder $out"
    out=$(cd "$out" && pwd)
    local venv=${REHEARSE_VENV:-$ROOT/.venv-gpu-image} steps=${REHEARSE_STEPS:-kernel_tests,engine_tests,export_tests,dry_run}
    local t0=$SECONDS
    bash "$ROOT/.ci/gpu-image-venv" "$venv" > "$out/venv.log" 2>&1 || fail "building $venv failed: $out/venv.log"
    local vpy=$venv/bin/python failed=0
    echo "[rehearse] venv ready in $((SECONDS - t0)) s: $("$vpy" -c 'import platform, torch, triton, numpy, transformers
print("Python", platform.python_version(), "torch", torch.__version__, "Triton", triton.__version__, "numpy",
      numpy.__version__, "transformers", transformers.__version__)')" | tee "$out/versions.txt"
    : > "$out/rehearsal.tsv"
    local step rc t
    for step in kernel_tests engine_tests export_tests dry_run; do
        [[ ",$steps," == *",$step,"* ]] || continue
        t=$SECONDS
        case $step in
            kernel_tests) HF_HUB_OFFLINE=1 "$vpy" -m pytest -q -p no:cacheprovider tests/cmd_kernels ;;
            engine_tests) HF_HUB_OFFLINE=1 "$vpy" -m pytest -q -p no:cacheprovider --durations=25 tests/engine ;;
            export_tests) HF_HUB_OFFLINE=1 "$vpy" -m pytest -q -p no:cacheprovider --durations=25 tests/export ;;
            dry_run) LEASE_PYTHON=$vpy bash "$SELF" --dry-run "$out/dry-run" ;;
        esac > "$out/$step.log" 2>&1
        rc=$?
        ((rc == 0)) || failed=1
        printf '%s\t%s\t%s\n' "$step" "$rc" "$((SECONDS - t))" >> "$out/rehearsal.tsv"
        echo "[rehearse] $step: $( ((rc == 0)) && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t)) s: $(tail -n 1 "$out/$step.log")"
    done
    echo "[rehearse] done in $((SECONDS - t0)) s; logs in $out"
    return $failed
}

# ---------------------------------------------------------------------------------------------- driver

collect() {
    "$PY" -m benchmarks.lease_summary collect --work "$WORK" --out "$OUT" --command "$COMMAND" \
        --budget-s "$BUDGET_S" --elapsed-s "$((SECONDS - START))" $( ((DRY)) && echo --dry-run) \
        || echo "[lease] collect failed (exit $?): the logs are in $WORK/logs"
}

record_stage() {  # record_stage NAME KIND STATUS RC SECONDS LIMIT AUTOTUNE
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"
}

run_stage() {  # run_stage NAME KIND LIMIT AUTOTUNE NEEDS
    local name=$1 kind=$2 limit=$3 tune=$4 needs=$5
    local override="LEASE_LIMIT_$name"
    limit=${!override:-$((limit * LIMIT_SCALE))}
    if [ "$needs" = engine ] && ((SETUP_FAILED)); then
        record_stage "$name" "$kind" blocked - 0 "$limit" "$tune"
        echo "[lease] $name: not run, setup failed (the engine cannot import)"
        collect
        return
    fi
    local left=$((DEADLINE - SECONDS - 10))  # 10 s stay for the last collect
    ((left < limit)) && limit=$left
    if ((left < 15)); then
        record_stage "$name" "$kind" skipped - 0 "$limit" "$tune"
        echo "[lease] $name: not run, $left s left"
        collect
        return
    fi
    local t0=$SECONDS rc status
    echo "[lease] $name: limit $limit s, CMD_AUTOTUNE=$tune"
    # SIGINT first: pytest then still writes its JUnit XML; KILL 15 s later if anything is left.
    CMD_LEASE_STAGE=$name CMD_LEASE_STAGE_LIMIT=$limit CMD_AUTOTUNE=${tune/#-/off} timeout -s INT -k 15 "$limit" \
        bash "$SELF" __stage "$name" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status=failed ;;
    esac
    [ "$name" = setup ] && [ "$status" != ok ] && SETUP_FAILED=1
    record_stage "$name" "$kind" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$tune"
    echo "[lease] $name: $status (exit $rc) in $((SECONDS - t0)) s"
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/    /'
    collect
}

bench_autotune() {  # full (best kernels) when every config is already compiled, fast otherwise
    if [ -n "${LEASE_BENCH_AUTOTUNE:-}" ]; then echo "$LEASE_BENCH_AUTOTUNE"; return; fi
    "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))
print("full" if d.get("cache_fits") is True or d.get("fill_rc") == 0 else "fast")' "$WORK/results/setup.json" 2>/dev/null \
        || echo fast
}

selected() {  # selected NAME DEFAULT: whether this run takes the stage (LEASE_STAGES, else the plan's default)
    if [ -n "${LEASE_STAGES:-}" ]; then [[ ",$LEASE_STAGES," == *",$1,"* ]]; else (($2)); fi
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

    SETUP_FAILED=0
    local line name kind limit tune needs default
    for line in "${STAGE_PLAN[@]}"; do
        read -r name kind limit tune needs default <<< "$line"
        selected "$name" "$default" || continue
        [ "$tune" = bench ] && tune=$(bench_autotune)
        run_stage "$name" "$kind" "$limit" "$tune" "$needs"
    done
    collect
    echo "[lease] done in $((SECONDS - START)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
    cat "$OUT/summary.md" 2>/dev/null
}

case "${1:-}" in
    --prepare)
        (($# == 1)) || die "--prepare takes no other argument"
        prepare
        ;;
    --plan)
        (($# == 1)) || die "--plan takes no other argument"
        plan
        ;;
    --rehearse)
        (($# <= 2)) || die "usage: bash benchmarks/gpu_lease.sh --rehearse [OUT]"
        rehearse "${2:-}"
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
        STAGE_DEADLINE=${CMD_LEASE_STAGE_LIMIT:-600}  # this process's SECONDS start at 0
        declare -F "stage_$STAGE" > /dev/null || die "unknown stage $STAGE"
        "stage_$STAGE"
        ;;
    -h | --help)
        usage
        ;;
    "" | -*)
        usage >&2
        die "expected OUT, --dry-run OUT, --prepare, --plan or --rehearse [OUT], got '${1:-}'"
        ;;
    *)
        (($# == 1)) || die "usage: bash benchmarks/gpu_lease.sh OUT"
        DRY=0
        lease "$1"
        ;;
esac
