#!/usr/bin/env bash
# slimcandle vs PyTorch (and onnxruntime for inference) on the CPU, side by side.
#
#   bash bench/compare.sh                         # everything (float rows: 20-40 minutes on 2 cores, plus the int8 rows)
#   QUICK=1 bash bench/compare.sh                 # 1 round, 2 timed batches: a smoke test
#   CONFIGS='infer.*b64' bash bench/compare.sh    # only configs whose label matches (grep -E)
#   CONFIGS='^int8' bash bench/compare.sh         # only the int8 table (needs no PyTorch)
#   CONFIGS='^latency' bash bench/compare.sh      # only the batch-1 latency block
#   LIST=1 bash bench/compare.sh                  # print the config labels and exit
#
# Knobs (environment):
#   THREADS=2        threads for both (slimcandle --threads, torch.set_num_threads,
#                    onnxruntime intra_op_num_threads)
#   ROUNDS=3         rounds per config; each round runs slimcandle, then PyTorch
#   ITERS=10         timed batches per run;  WARMUP=3  untimed batches before them
#   LAT_ITERS=500    timed images per run of the latency rows; LAT_WARMUP=50 untimed before
#   AGG=median       how rounds are combined in the table: median or best (highest images/s)
#   ORT=1            also time onnxruntime in the infer rows (0 to skip)
#   OV=1             also time OpenVINO (CPU plugin, f32, one stream, THREADS threads) in the
#                    infer and latency rows: installed with pip when missing; where pip cannot
#                    reach it the column is skipped with the reason printed (0 to skip)
#   CONFIGS=REGEX    run only the configs whose label matches
#   NOSPIN=0         1: idle worker threads sleep instead of spinning, in PyTorch
#                    (OMP_WAIT_POLICY=PASSIVE) and onnxruntime (allow_spinning=0). Use it when
#                    the machine is busy: spinning OpenMP threads then slow PyTorch ~20x.
#   QUICK=1          ROUNDS=1 ITERS=2 WARMUP=1 LAT_ITERS=5 LAT_WARMUP=1 unless those are set
#   RAW=FILE         where the raw JSON lines go (default: a new file under /tmp)
#   EXPORTS=1        also time onnxruntime on slimcandle's own ONNX exports (fp32 and int8 QDQ
#                    of the shared fixtures, 8 x 224 x 224) beside our engine; 0 to skip
#   FIXTURES=DIR     the shared fixtures for EXPORTS and the int8 rows (default ../shared/fixtures)
#
# The int8 rows (labels "int8 NAME STEM bN SxS") time, in each round: slimcandle's integer
# engine on a checkpoint made by `slimcandle quantize` from the fixture imported at that stem
# and size; onnxruntime on the same network's fp32 `slimcandle export` quantized by
# onnxruntime's quantize_static (bench/ort_quantize.py: QDQ, per-channel); onnxruntime on our
# own QDQ export of the int8 checkpoint; slimcandle fp32; onnxruntime fp32 (the fp32 export).
#   PYTHON=python3   SLIMCANDLE=target/release/slimcandle
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${QUICK:-0}" == 1 ]]; then
    ROUNDS=${ROUNDS:-1} ITERS=${ITERS:-2} WARMUP=${WARMUP:-1}
    LAT_ITERS=${LAT_ITERS:-5} LAT_WARMUP=${LAT_WARMUP:-1}
fi
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-3}
AGG=${AGG:-median}
ORT=${ORT:-1}
OV=${OV:-1}
CONFIGS=${CONFIGS:-}
NOSPIN=${NOSPIN:-0}
PYTHON=${PYTHON:-python3}
SLIMCANDLE=${SLIMCANDLE:-target/release/slimcandle}
case "$AGG" in median|best) ;; *) echo "AGG must be median or best, not '$AGG'" >&2; exit 2 ;; esac

# The six families: model label | arch options (same for slimcandle and PyTorch).
FAMILIES=(
    "mobilenet_v2|--arch mobilenet_v2"
    "mobilenet_v3_small|--arch mobilenet_v3_small"
    "shufflenet_v2_x1_0|--arch shufflenet_v2 --width 1.0"
    "shufflenet_v1_g3|--arch shufflenet_v1 --groups 3 --width 1.0"
    "squeezenet1_1|--arch squeezenet1_1"
    "mobilenet_v1_w0_5|--arch mobilenet_v1 --width 0.5"
)
# mode | batch | size | stem | model label | arch options, one block of the six families per
# setting. 96x96 batch 32 is torchvision's architectures at another size (issue #15: the
# speed must carry over to other sizes).
ALL_CONFIGS=()
for setting in "train|64|32|cifar" "train|32|96|imagenet" "infer|64|32|cifar" \
               "infer|32|96|imagenet" "infer|8|224|imagenet"; do
    for m in "${FAMILIES[@]}"; do
        ALL_CONFIGS+=("$setting|$m")
    done
done
# The issue's figures for this one: PyTorch ~830 images/s, onnxruntime ~2,900.
ALL_CONFIGS+=("infer|500|32|cifar|mobilenet_v2|--arch mobilenet_v2")
# The latency rows: one image at a time (eval mode), LAT_ITERS timed after LAT_WARMUP, median
# and 95th percentile of the per-image times; label "latency NAME STEM b1 SxS".
for m in "${FAMILIES[@]}"; do
    ALL_CONFIGS+=("latency|1|224|imagenet|$m" "latency|1|32|cifar|$m")
done
LAT_ITERS=${LAT_ITERS:-500}
LAT_WARMUP=${LAT_WARMUP:-50}

label_of() { # config line -> "infer mobilenet_v2 cifar b64 32x32"
    local mode batch size stem name args
    IFS='|' read -r mode batch size stem name args <<<"$1"
    echo "$mode $name $stem b$batch ${size}x${size}"
}

# The int8 rows: batch | size | stem | fixture name | import options; label "int8 NAME STEM bN SxS".
# The issue's bar for these: our int8 at least 1.0x onnxruntime's int8 (quantize_static) and at
# least 2x our fp32; onnxruntime int8 runs ~6,110 images/s on MobileNet V2 32x32 batch 500.
INT8_CONFIGS=()
for m in "mobilenet_v2|--arch mobilenet_v2" "shufflenet_v2_x1_0|--arch shufflenet_v2_x1_0" \
         "mobilenet_v3_small|--arch mobilenet_v3_small"; do
    INT8_CONFIGS+=("64|32|cifar|$m" "500|32|cifar|$m" "8|224|imagenet|$m")
done
int8_label_of() { # int8 config line -> "int8 mobilenet_v2 cifar b64 32x32"
    local batch size stem name args
    IFS='|' read -r batch size stem name args <<<"$1"
    echo "int8 $name $stem b$batch ${size}x${size}"
}

# The rows of the exports table (EXPORTS=1): fixture name | import options; label "export NAME".
EXPORT_MODELS=(
    "mobilenet_v2|--arch mobilenet_v2"
    "mobilenet_v3_small|--arch mobilenet_v3_small"
    "shufflenet_v2_x1_0|--arch shufflenet_v2_x1_0"
    "squeezenet1_1|--arch squeezenet1_1"
)

SELECTED=()
for c in "${ALL_CONFIGS[@]}"; do
    if [[ -z "$CONFIGS" ]] || label_of "$c" | grep -Eq -- "$CONFIGS"; then
        SELECTED+=("$c")
    fi
done
INT8_SELECTED=()
for c in "${INT8_CONFIGS[@]}"; do
    if [[ -z "$CONFIGS" ]] || int8_label_of "$c" | grep -Eq -- "$CONFIGS"; then
        INT8_SELECTED+=("$c")
    fi
done
EXPORTS_SELECTED=()
if [[ "${EXPORTS:-1}" == 1 && "${ORT:-1}" == 1 ]]; then
    for e in "${EXPORT_MODELS[@]}"; do
        if [[ -z "$CONFIGS" ]] || grep -Eq -- "$CONFIGS" <<<"export ${e%%|*}"; then
            EXPORTS_SELECTED+=("$e")
        fi
    done
fi
if [[ "${LIST:-0}" == 1 ]]; then
    for c in "${ALL_CONFIGS[@]}"; do label_of "$c"; done
    for c in "${INT8_CONFIGS[@]}"; do int8_label_of "$c"; done
    for e in "${EXPORT_MODELS[@]}"; do echo "export ${e%%|*}"; done
    exit 0
fi
if [[ ${#SELECTED[@]} -eq 0 && ${#INT8_SELECTED[@]} -eq 0 && ${#EXPORTS_SELECTED[@]} -eq 0 ]]; then
    echo "no config matches CONFIGS='$CONFIGS'; LIST=1 shows the labels" >&2
    exit 2
fi

if [[ ! -x "$SLIMCANDLE" ]]; then
    echo "building $SLIMCANDLE (cargo build --release)" >&2
    cargo build --release >&2
fi
# PyTorch only runs the train and infer rows; the int8 and exports tables need onnxruntime only.
if [[ ${#SELECTED[@]} -gt 0 ]] && ! "$PYTHON" -c 'import torch, torchvision' 2>/dev/null; then
    echo "PyTorch and torchvision are needed for the train and infer rows: pip install torch" \
        "torchvision (CONFIGS='^int8' runs only the int8 rows, which do not need them)" >&2
    exit 1
fi
if [[ "$ORT" == 1 ]] && ! "$PYTHON" -c 'import onnx, onnxruntime' 2>/dev/null; then
    echo "installing onnx and onnxruntime (pip); ORT=0 skips them" >&2
    "$PYTHON" -m pip install --quiet onnx onnxruntime >&2
fi

if [[ "$OV" == 1 ]] && ! "$PYTHON" -c 'import openvino, onnx' 2>/dev/null; then
    echo "installing openvino (pip); OV=0 skips it" >&2
    if ! "$PYTHON" -m pip install --quiet openvino onnx >&2; then
        echo "OpenVINO column skipped: pip could not install openvino" >&2
        OV=0
    fi
fi

RAW=${RAW:-$(mktemp /tmp/slimcandle-compare.XXXXXX.jsonl)}
: >"$RAW"
ERRLOG="$RAW.stderr"
: >"$ERRLOG"

versions=$("$PYTHON" - <<'EOF'
try:
    import torch
    t = torch.__version__
except ImportError:
    t = "-"
try:
    import onnxruntime as ort
    o = ort.__version__
except ImportError:
    o = "-"
try:
    import openvino as ov
    v = ov.__version__
except ImportError:
    v = "-"
print(f"torch {t}, onnxruntime {o}, openvino {v}")
EOF
)
echo "# slimcandle vs PyTorch, CPU"
echo
echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $("$SLIMCANDLE" --version), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $versions"
echo "- THREADS=$THREADS ROUNDS=$ROUNDS ITERS=$ITERS WARMUP=$WARMUP AGG=$AGG ORT=$ORT OV=$OV NOSPIN=$NOSPIN, ${#SELECTED[@]} config(s), ${#INT8_SELECTED[@]} int8 row(s)"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    echo "- WARNING: the machine is busy (load $load1): other processes compete for the cores and the numbers are unreliable"
    if [[ "$NOSPIN" != 1 ]]; then
        echo "  (PyTorch's spinning OpenMP threads suffer most from this; NOSPIN=1 makes them sleep)"
    fi
fi
if [[ -n "${OPENBLAS_CORETYPE:-}${OPENBLAS_L2_SIZE:-}" ]]; then
    echo "- note: OPENBLAS_CORETYPE='${OPENBLAS_CORETYPE:-}' OPENBLAS_L2_SIZE='${OPENBLAS_L2_SIZE:-}' are set (see bench/README.md)"
fi
echo "- raw results: $RAW (stderr of the runs: $ERRLOG)"
echo

# Appends one JSON line for a run: {"config","order","tool","round","result"|"error"}.
record() { # label order tool round rc output
    "$PYTHON" - "$@" >>"$RAW" <<'EOF'
import json, sys
label, order, tool, rnd, rc, out = sys.argv[1:7]
rec = {"config": label, "order": int(order), "tool": tool, "round": int(rnd)}
try:
    if rc != "0":
        raise ValueError(f"exit code {rc}")
    rec["result"] = json.loads(out)
except ValueError as e:
    rec["error"] = str(e)
print(json.dumps(rec))
EOF
}

order=0
for c in "${SELECTED[@]}"; do
    IFS='|' read -r mode batch size stem name args <<<"$c"
    label=$(label_of "$c")
    read -r -a arch_args <<<"$args"
    bench_mode=$mode warmup=$WARMUP iters=$ITERS
    [[ "$mode" == latency ]] && bench_mode=infer warmup=$LAT_WARMUP iters=$LAT_ITERS
    common=(--stem "$stem" --num-classes 10 --batch "$batch" --size "$size" --mode "$bench_mode"
            --warmup "$warmup" --iterations "$iters" --threads "$THREADS" --json)
    py_extra=()
    py_env=(OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS")
    [[ "$bench_mode" == infer && "$ORT" == 1 ]] && py_extra=(--onnxruntime)
    [[ "$bench_mode" == infer && "$OV" == 1 ]] && py_extra+=(--openvino)
    if [[ "$NOSPIN" == 1 ]]; then
        py_env+=(OMP_WAIT_POLICY=PASSIVE)
        [[ "$bench_mode" == infer && "$ORT" == 1 ]] && py_extra+=(--onnxruntime-no-spin)
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        echo "[$label] round $r/$ROUNDS: slimcandle" >&2
        rc=0
        out=$("$SLIMCANDLE" bench "${arch_args[@]}" "${common[@]}" 2>>"$ERRLOG") || rc=$?
        record "$label" "$order" slimcandle "$r" "$rc" "$out"
        echo "[$label] round $r/$ROUNDS: pytorch${py_extra:+ + ${py_extra[*]}}" >&2
        rc=0
        out=$(env "${py_env[@]}" "$PYTHON" bench/pytorch_reference.py "${arch_args[@]}" "${common[@]}" "${py_extra[@]}" \
            2>>"$ERRLOG") || rc=$?
        record "$label" "$order" pytorch "$r" "$rc" "$out"
    done
    order=$((order + 1))
done

# The int8 rows. The files are made once per model, stem and size (checkpoints) or batch (ONNX),
# untimed, before the rounds; each round then runs the five timings one after the other.
FIXTURES=${FIXTURES:-../shared/fixtures}
ort_extra=()
[[ "$NOSPIN" == 1 ]] && ort_extra=(--no-spin)
if [[ ${#INT8_SELECTED[@]} -gt 0 && ! -d "$FIXTURES" ]]; then
    echo "skipping the int8 rows: fixtures folder $FIXTURES is absent (FIXTURES=DIR)"
    INT8_SELECTED=()
fi
if [[ ${#INT8_SELECTED[@]} -gt 0 ]]; then
    INT8_DIR=$(mktemp -d /tmp/slimcandle-int8.XXXXXX)
    echo "- int8 rows: checkpoints and ONNX files in $INT8_DIR"
    echo
fi
# Runs one preparation step, recording a failure as an error of tool "prepare STEP" (its
# stderr is in ERRLOG); returns its exit code.
prepare() { # label order step command...
    local label=$1 ord=$2 step=$3 rc=0
    shift 3
    "$@" >/dev/null 2>>"$ERRLOG" || rc=$?
    [[ $rc == 0 ]] || record "$label" "$ord" "prepare $step" 1 "$rc" ""
    return "$rc"
}
for c in "${INT8_SELECTED[@]}"; do
    IFS='|' read -r batch size stem name args <<<"$c"
    label=$(int8_label_of "$c")
    read -r -a arch_args <<<"$args"
    base="$INT8_DIR/$name.$stem$size"
    fp32="$base.safetensors" int8="$base.int8.safetensors"
    onnx_fp32="$base.b$batch.onnx" onnx_ours="$base.int8.b$batch.onnx" onnx_ortq="$base.ortq.b$batch.onnx"
    echo "[$label] import, quantize, export" >&2
    [[ -f "$fp32" ]] || prepare "$label" "$order" import "$SLIMCANDLE" import "${arch_args[@]}" \
        --num-classes 10 --stem "$stem" --input-size "$size" "$FIXTURES/$name.safetensors" \
        -o "$fp32" || { order=$((order + 1)); continue; }
    [[ -f "$int8" ]] || prepare "$label" "$order" quantize "$SLIMCANDLE" quantize "$fp32" \
        --data shapes --calibration 32 --test-limit 10 --threads "$THREADS" -o "$int8" \
        || { order=$((order + 1)); continue; }
    if [[ "$ORT" == 1 ]]; then
        echo "[$label] onnxruntime quantize_static" >&2
        prepare "$label" "$order" "export fp32" "$SLIMCANDLE" export "$fp32" -o "$onnx_fp32" \
            --batch "$batch" --input-size "$size,$size" --threads "$THREADS" &&
        prepare "$label" "$order" "export int8" "$SLIMCANDLE" export "$int8" -o "$onnx_ours" \
            --batch "$batch" --input-size "$size,$size" --threads "$THREADS" &&
        prepare "$label" "$order" quantize_static "$PYTHON" bench/ort_quantize.py "$onnx_fp32" \
            -o "$onnx_ortq" --size "$size" || { order=$((order + 1)); continue; }
    fi
    ours=(--mode infer --batch-size "$batch" --input-size "$size" --warmup "$WARMUP"
          --iterations "$ITERS" --threads "$THREADS" --json)
    ort=(--batch "$batch" --size "$size" --threads "$THREADS" --warmup "$WARMUP"
         --iterations "$ITERS" "${ort_extra[@]}")
    # tool | checkpoint (slimcandle) or ONNX file (onnxruntime), in the order each round runs them
    runs=("slimcandle_int8|$int8")
    [[ "$ORT" == 1 ]] && runs+=("ort_int8_quantize_static|$onnx_ortq" "ort_int8_ours|$onnx_ours")
    runs+=("slimcandle_fp32|$fp32")
    [[ "$ORT" == 1 ]] && runs+=("ort_fp32|$onnx_fp32")
    for ((r = 1; r <= ROUNDS; r++)); do
        for run in "${runs[@]}"; do
            tool=${run%%|*} file=${run#*|}
            echo "[$label] round $r/$ROUNDS: $tool" >&2
            rc=0
            if [[ "$tool" == slimcandle_* ]]; then
                out=$("$SLIMCANDLE" bench "$file" "${ours[@]}" 2>>"$ERRLOG") || rc=$?
            else
                out=$("$PYTHON" bench/ort_time.py "$file" "${ort[@]}" 2>>"$ERRLOG") || rc=$?
            fi
            record "$label" "$order" "$tool" "$r" "$rc" "$out"
        done
    done
    order=$((order + 1))
done

status=0
if [[ ${#SELECTED[@]} -gt 0 || ${#INT8_SELECTED[@]} -gt 0 ]]; then
    "$PYTHON" bench/summarize.py "$RAW" --agg "$AGG" || status=$?
    echo
fi

# onnxruntime on our own exports: the fixture imported, quantized (int8, calibrated on 32
# synthetic images) and exported with `slimcandle export`; both engines run the same files.
if [[ ${#EXPORTS_SELECTED[@]} -gt 0 && ! -d "$FIXTURES" ]]; then
    echo "skipping the exports table: fixtures folder $FIXTURES is absent"
elif [[ ${#EXPORTS_SELECTED[@]} -gt 0 ]]; then
    EXPORT_DIR=$(mktemp -d /tmp/slimcandle-exports.XXXXXX)
    ips() { "$PYTHON" -c 'import json, sys; print(round(json.load(sys.stdin)["images_per_s"], 1))'; }
    echo "## onnxruntime on slimcandle's exports (infer, batch 8, 224x224, $THREADS threads, best of $ROUNDS)"
    echo
    echo "| model | slimcandle fp32 | onnxruntime fp32 | slimcandle int8 | onnxruntime int8 (QDQ) |"
    echo "|---|---|---|---|---|"
    for spec in "${EXPORTS_SELECTED[@]}"; do
        IFS='|' read -r name args <<<"$spec"
        read -r -a arch_args <<<"$args"
        fp32="$EXPORT_DIR/$name.safetensors" int8="$EXPORT_DIR/$name.int8.safetensors"
        echo "[export $name] import, quantize, export" >&2
        "$SLIMCANDLE" import "${arch_args[@]}" --num-classes 10 "$FIXTURES/$name.safetensors" -o "$fp32" >&2 2>>"$ERRLOG"
        "$SLIMCANDLE" quantize "$fp32" --data shapes --calibration 32 --test-limit 10 -o "$int8" >/dev/null 2>>"$ERRLOG"
        row="| $name"
        for ckpt in "$fp32" "$int8"; do
            "$SLIMCANDLE" export "$ckpt" -o "$ckpt.onnx" --batch 8 --input-size 224,224 2>>"$ERRLOG"
            best_ours=0 best_ort=0
            for ((r = 1; r <= ROUNDS; r++)); do
                echo "[export $name] round $r/$ROUNDS: $(basename "$ckpt")" >&2
                v=$("$SLIMCANDLE" bench "$ckpt" --mode infer --batch-size 8 --input-size 224 \
                    --warmup "$WARMUP" --iterations "$ITERS" --threads "$THREADS" --json 2>>"$ERRLOG" | ips)
                best_ours=$(awk -v a="$best_ours" -v b="$v" 'BEGIN { print (b > a ? b : a) }')
                v=$("$PYTHON" bench/ort_time.py "$ckpt.onnx" --batch 8 --size 224 --threads "$THREADS" \
                    --warmup "$WARMUP" --iterations "$ITERS" "${ort_extra[@]}" 2>>"$ERRLOG" | ips)
                best_ort=$(awk -v a="$best_ort" -v b="$v" 'BEGIN { print (b > a ? b : a) }')
            done
            row="$row | $best_ours | $best_ort"
        done
        echo "$row |"
    done
    echo
    echo "(images/s; exports kept in $EXPORT_DIR)"
fi
echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
