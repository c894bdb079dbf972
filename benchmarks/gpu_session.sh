#!/usr/bin/env bash
# One GPU session, end to end, in a fixed time budget: environment, Fashion-MNIST shards, the U-Net
# throughput benchmark (benchmarks/gpu_throughput.py), a few bf16 steps of every family with the speed
# defaults, DeepSpeed ZeRO-2 with one process, then (time permitting) the ddpm-cifar10 benchmark,
# evaluation feature-extraction timings and the memory table (benchmarks/memory.py, one process: a lent
# machine has one GPU, so FSDP2's sharding goal, which needs 2, is not measured here; activation
# checkpointing's is).
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]          # OUT_DIR defaults to $OUT
#
# Each step runs under its own `timeout`, logs to OUT_DIR/<step>.log, and a failure does not stop the
# others. At most 9 files are written to OUT_DIR (the 8 step logs and summary.txt); the summary is also
# printed at the end. The raw data are Fashion-MNIST's .gz files in .gpudata/ (the repo root), or
# $GPU_SESSION_FMNIST.
#
# Environment:
#   PY                    python to use (default python3)
#   GPU_SESSION_CPU=1     CPU smoke run: tiny step counts, no nvidia-smi (still bf16)
#   GPU_SESSION_BUDGET    seconds for the whole script (default 430); optional steps shrink or are skipped
#   GPU_SESSION_STEPS     steps to run, in order (default: env shard fm families cifar evalfeat memory)
#   GPU_SESSION_FAMILIES  only these runs of the families step, e.g. "diffusion ldm zero2" (default: all configs,
#                         the autoencoder -> ldm chain and zero2)
#   GPU_SESSION_WORK      scratch folder (default /tmp/gpu_session)
#   GPU_SESSION_SITE      the pip --target folder (default: first PYTHONPATH entry), for the hub fallback
set -u

OUT_DIR=${1:-${OUT:-}}
[ -n "$OUT_DIR" ] || { echo "usage: $0 OUT_DIR (or set OUT)" >&2; exit 2; }
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PY:-python3}
CPU=${GPU_SESSION_CPU:-0}
BUDGET=${GPU_SESSION_BUDGET:-430}
STEPS=${GPU_SESSION_STEPS:-"env shard fm families cifar evalfeat memory"}
FAMILIES=${GPU_SESSION_FAMILIES:-}
WORK=${GPU_SESSION_WORK:-/tmp/gpu_session}
FMNIST=${GPU_SESSION_FMNIST:-$REPO/.gpudata}
SITE=${GPU_SESSION_SITE:-${PYTHONPATH%%:*}}
DATAROOT=$WORK/data          # the configs' data/ folder
DATA=$DATAROOT/fashion-mnist
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-$REPO}
export DISTGEN_CACHE=$WORK/cache
# a fresh scratch folder (an earlier one of this script's is removed; anything else there is refused)
if [ -e "$WORK" ]; then
  [ -f "$WORK/.gpu_session" ] || { echo "$WORK exists and is not this script's scratch folder" >&2; exit 2; }
  rm -rf "$WORK"
fi
mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/rc" && touch "$WORK/.gpu_session"
for f in env shard fm families zero2 cifar evalfeat memory summary; do rm -f "$OUT_DIR/$f.log" "$OUT_DIR/$f.txt"; done
T0=$(date +%s)
STATUS=()
# What the configs need: `shards` lists the `distgen data shard` commands in the configs' comments (with
# Fashion-MNIST read from $FMNIST, into $DATAROOT), train and test each; `overrides CONFIG` maps the config's
# data/ paths to $DATAROOT.
cat >"$WORK/plan.py" <<'EOF_PLAN'
import glob, re, sys, yaml
fmnist, root = sys.argv[1], sys.argv[2]
if sys.argv[3] == "shards":
    jobs = {("fashion-mnist:" + fmnist, root + "/fashion-mnist")}
    for cfg in sorted(glob.glob("configs/fashion_mnist_*.yaml")):
        for src, out in re.findall(r'distgen data shard ("[^"]+"|\S+)\s+(data/\S+)\s+--split', open(cfg).read()):
            src = src.strip('"')
            if src.split(":")[0] == "fashion-mnist":
                src = "fashion-mnist:" + fmnist + src[len("fashion-mnist"):]
            jobs.add((src, root + out[len("data"):]))
    for src, out in sorted(jobs):
        for split in ("train", "test"):
            print(f"{src}\t{out}\t{split}")
else:
    data = (yaml.safe_load(open(sys.argv[4])) or {}).get("data") or {}
    for key, val in data.items():
        if isinstance(val, list) and val and all(isinstance(v, str) for v in val) and any(v.startswith("data/") for v in val):
            print(f"data.{key}=[" + ",".join(root + v[len("data"):] if v.startswith("data/") else v for v in val) + "]")
EOF_PLAN

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(date +%s) + T0 )); }
# cap SECONDS [RESERVE]: SECONDS, or less so that RESERVE seconds of the budget stay free
cap() { local l=$(( $(left) - ${2:-0} )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
note() { echo "[gpu_session +$(elapsed)s] $*"; }
status() { STATUS+=("$1"); note "$1"; }
# [LABEL=...] run_step NAME SECONDS CMD...: CMD under timeout, output to OUT_DIR/NAME.log
run_step() {
  local name=$1 t=$2; shift 2
  local label=${LABEL:-$name}
  if [ "$t" -lt 5 ]; then status "STEP $label SKIPPED (no time left)"; return 0; fi
  note "step $label (timeout ${t}s)"
  local s=$(date +%s) rc=0
  echo "== $*" | cut -c1-300 >>"$OUT_DIR/$name.log"
  timeout -k 10 "$t" "$@" >>"$OUT_DIR/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then status "STEP $label ok ($(( $(date +%s) - s ))s)"
  else status "STEP $label FAILED rc=$rc ($(( $(date +%s) - s ))s$([ "$rc" = 124 ] && echo ', timed out'))"; fi
  return 0
}

if [ "$CPU" = 1 ]; then
  FM_ARGS=(--preset tiny --batch 8 --steps 4 --warmup 2 --workers 1)
  CIFAR_ARGS=(--preset tiny --batch 8 --resolution 32 --channels 3 --steps 4 --warmup 2 --workers 1)
  FAM_STEPS=6; FAM_LOG=3; MAXJOBS=1; FAM_CAP=1200; EVAL_N=64; CIFAR_MIN=30; EVALCPU_N=32
  MEM_ARGS=(--models unet --engines ddp --unet-preset tiny --batch 4 --resolution 8 --steps 2 --warmup 1)
else
  FM_ARGS=(--preset small --batch 256 --steps 60 --warmup 10 --workers 6)
  CIFAR_ARGS=(--preset ddpm-cifar10 --batch 128 --resolution 32 --channels 3 --steps 40 --warmup 10 --workers 6)
  FAM_STEPS=40; FAM_LOG=20; MAXJOBS=12; FAM_CAP=180; EVAL_N=10000; CIFAR_MIN=100; EVALCPU_N=128
  # 8 launches (2 engines x activation checkpointing off/on x 2 batches): what the budget's end leaves room for
  MEM_ARGS=(--models unet --engines ddp,fsdp2 --batch 64 --resolution 32 --channels 3 --steps 10 --warmup 5
            --workers 4)
fi

# ------------------------------------------------------------------ a. environment and the carried wheels
step_env() {
  local log=$OUT_DIR/env.log
  {
    echo "repo $REPO  python $PY  PYTHONPATH=$PYTHONPATH  cpu_mode=$CPU  budget=${BUDGET}s"
    [ "$CPU" = 1 ] || { nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; }
    echo "cores $(nproc)  $(free -g | awk '/Mem:/{print "mem " $2 " GiB"}')"
  } >>"$log" 2>&1
  LABEL=env-torch run_step env 60 "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
  # diffusers 0.42 wants huggingface_hub >= 1.32: if the machine's is older and diffusers fails on it, the hub
  # and its dependencies from .whl/hub/ go into the --target folder too (only then: transformers may want the old one).
  timeout 60 "$PY" -c 'import diffusers' >"$WORK/logs/diffusers-import.log" 2>&1 || cat "$WORK/logs/diffusers-import.log" >>"$log"
  if grep -q huggingface_hub "$WORK/logs/diffusers-import.log" && [ -d .whl/hub ] && [ -n "$SITE" ]; then
    echo "diffusers does not import with the installed huggingface_hub: installing .whl/hub/ into $SITE" >>"$log"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/hub/*.whl >>"$log" 2>&1
  fi
  LABEL=env-imports run_step env 120 "$PY" - <<'EOF'
import importlib, importlib.metadata as md, warnings
warnings.filterwarnings("ignore")
bad = []
for mod, dist in [("torch", "torch"), ("torchvision", "torchvision"), ("accelerate", "accelerate"),
                  ("transformers", "transformers"), ("huggingface_hub", "huggingface_hub"), ("diffusers", "diffusers"),
                  ("deepspeed", "deepspeed"), ("torch_fidelity", "torch-fidelity"), ("webdataset", "webdataset"),
                  ("submitit", "submitit"), ("pydantic", "pydantic"), ("google.protobuf", "protobuf"),
                  ("typing_extensions", "typing_extensions"), ("numpy", "numpy"),
                  ("torch.utils.tensorboard", "tensorboard"), ("distgen.train", None)]:
    try:
        m = importlib.import_module(mod)
        print(f"{mod:24s} {md.version(dist) if dist else '':12s} {getattr(m, '__file__', '')}")
    except Exception as e:
        bad.append(mod)
        print(f"{mod:24s} IMPORT FAILED: {type(e).__name__}: {e}")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
raise SystemExit(1 if bad else 0)
EOF
}

# ------------------------------------------------------------------ b. Fashion-MNIST shards (train + test, as the demo)
# Fashion-MNIST itself is waited for; the other data sets (the translation configs') go on in the background
# (one core each) until the families step needs them.
EXTRA_PIDS=(); EXTRA_LOGS=()
collect_shards() {  # LABEL LOG...: append the logs to shard.log, one status line
  local label=$1 failed=0 n=0; shift
  for f in "$@"; do
    n=$((n + 1)); cat "$f" >>"$OUT_DIR/shard.log"; tail -n1 "$f" | grep -qx 'rc=0' || failed=$((failed + 1))
  done
  if [ "$failed" = 0 ]; then status "STEP $label ok: $n split(s)"; else status "STEP $label FAILED: $failed of $n split(s)"; fi
}
step_shard() {
  local t te i=0 base_pids=() base_logs=(); t=$(cap 100); te=$(cap 240)
  note "step shard (timeout ${t}s; other data sets ${te}s, in the background)"
  while IFS=$'\t' read -r src out split; do
    i=$((i + 1))
    local log=$WORK/logs/shard-$i.log tt=$te
    [ "$out" = "$DATA" ] && tt=$t
    ( echo "== distgen data shard '$src' $out --split $split"
      timeout -k 10 "$tt" "$PY" -m distgen data shard "$src" "$out" --split "$split" --samples-per-shard 5000 2>&1 \
        | grep -v '^wrote '
      echo "rc=${PIPESTATUS[0]}" ) >"$log" 2>&1 &
    if [ "$out" = "$DATA" ]; then base_pids+=($!); base_logs+=("$log"); else EXTRA_PIDS+=($!); EXTRA_LOGS+=("$log"); fi
  done < <("$PY" "$WORK/plan.py" "$FMNIST" "$DATAROOT" shards 2>>"$OUT_DIR/shard.log")
  [ ${#base_pids[@]} -gt 0 ] && wait "${base_pids[@]}"
  collect_shards shard-fashion-mnist "${base_logs[@]}"
}
wait_extra_shards() {
  [ ${#EXTRA_PIDS[@]} -gt 0 ] || return 0
  wait "${EXTRA_PIDS[@]}"; collect_shards shard-other "${EXTRA_LOGS[@]}"; EXTRA_PIDS=(); EXTRA_LOGS=()
}

# ------------------------------------------------------------------ c. the U-Net benchmark (distgen vs plain vs tuned)
step_fm() {
  run_step fm "$(cap 170 60)" "$PY" benchmarks/gpu_throughput.py "${FM_ARGS[@]}" --resolution 28 --channels 1 \
    --precision bf16 --manifest "$DATA/train.manifest.json"
}

step_cifar() {
  # gpu_throughput.py's own random shards (no --manifest) call open_source() with a bare .npz path, which
  # it refuses ("unknown source"): random 32x32 RGB images are sharded here and passed as --manifest.
  local t; t=$(cap 200 5)
  if [ "$t" -lt "$CIFAR_MIN" ]; then status "STEP cifar SKIPPED (${t}s left, needs $CIFAR_MIN)"; return 0; fi
  LABEL=cifar-npz run_step cifar 60 "$PY" -c "
import numpy as np
np.savez('$WORK/random.npz', x=np.random.default_rng(0).integers(0, 256, (8192, 32, 32, 3), dtype=np.uint8))"
  LABEL=cifar-shard run_step cifar 60 "$PY" -m distgen data shard "npz:$WORK/random.npz" "$WORK/random" --split train --samples-per-shard 2048
  run_step cifar "$(cap 200 5)" "$PY" benchmarks/gpu_throughput.py "${CIFAR_ARGS[@]}" --precision bf16 \
    --manifest "$WORK/random/train.manifest.json"
}

# ------------------------------------------------------------------ d + e. every family, and ZeRO-2, a few bf16 steps each
fam_overrides() {  # NAME CONFIG
  echo "run.dir=$WORK/runs/$1" $("$PY" "$WORK/plan.py" "$FMNIST" "$DATAROOT" overrides "$2") \
    "train.max_steps=$FAM_STEPS" "train.log_every=$FAM_LOG" "train.sample_every=0" "train.sample_num=4" \
    "train.checkpoint_every=100000" "train.mixed_precision=bf16"
}
fam_train() {  # NAME CONFIG DEADLINE [extra overrides...]: one training run, rc to $WORK/rc/NAME
  local name=$1 cfg=$2 deadline=$3; shift 3
  local t=$(( deadline - $(date +%s) )) rc=0
  if [ "$t" -lt 5 ]; then echo 124 >"$WORK/rc/$name"; echo "no time left" >"$WORK/logs/$name.log"; return 1; fi
  # shellcheck disable=SC2046
  timeout -k 10 "$t" "$PY" -m distgen train "$cfg" $(fam_overrides "$name" "$cfg") "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
  echo "$rc" >"$WORK/rc/$name"; return "$rc"
}
ldm_chain() {  # autoencoder -> export -> latent diffusion on it
  local deadline=$1 rc=0
  fam_train autoencoder configs/fashion_mnist_autoencoder.yaml "$deadline" \
    "model.disc_start_kimg=$(awk "BEGIN{print $FAM_STEPS * 32 / 2000}")" || { echo skipped >"$WORK/rc/ldm"; return 1; }
  timeout -k 10 $(( deadline - $(date +%s) > 5 ? deadline - $(date +%s) : 5 )) \
    "$PY" -m distgen export "$WORK/runs/autoencoder" "$WORK/runs/ae-export" >"$WORK/logs/ae-export.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { echo "export:$rc" >"$WORK/rc/ldm"; return 1; }
  fam_train ldm configs/fashion_mnist_ldm.yaml "$deadline" "model.autoencoder=$WORK/runs/ae-export"
}
zero2_train() {
  local deadline=$1 rc=0 t=$(( $1 - $(date +%s) ))
  timeout -k 10 "$t" "$PY" -m accelerate.commands.launch --config_file configs/accelerate/zero2.yaml --num_processes 1 \
    --main_process_port 29533 -m distgen train configs/fashion_mnist_diffusion.yaml $(fam_overrides zero2 configs/fashion_mnist_diffusion.yaml) \
    >"$WORK/logs/zero2.log" 2>&1 || rc=$?
  echo "$rc" >"$WORK/rc/zero2"
}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "$MAXJOBS" ]; do sleep 1; done; }

step_families() {
  wait_extra_shards
  local win; win=$(cap "$FAM_CAP" 10)
  if [ "$win" -lt 20 ]; then status "STEP families SKIPPED (no time left)"; return 0; fi
  local deadline=$(( $(date +%s) + win )) s=$(date +%s)
  note "step families + zero2: all at once (at most $MAXJOBS processes), until +$(( deadline - T0 ))s"
  # Compilation of ~10 processes at once on one machine: a few inductor compile workers each.
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  [ -z "$FAMILIES" ] || [[ " $FAMILIES " == *" ldm "* ]] && ldm_chain "$deadline" &
  [ -z "$FAMILIES" ] || [[ " $FAMILIES " == *" zero2 "* ]] && zero2_train "$deadline" &
  local names=()
  for cfg in configs/fashion_mnist_*.yaml; do
    local name; name=$(basename "$cfg" .yaml); name=${name#fashion_mnist_}
    case $name in autoencoder|ldm) continue ;; esac
    [ -z "$FAMILIES" ] || [[ " $FAMILIES " == *" $name "* ]] || continue
    names+=("$name"); throttle
    fam_train "$name" "$cfg" "$deadline" &
  done
  wait
  unset TORCHINDUCTOR_COMPILE_THREADS OMP_NUM_THREADS
  local failed=0
  {
    echo "== per family: exit code | speed line | last progress line ($FAM_STEPS steps, bf16; up to $MAXJOBS runs shared the device, so samples/s are not solo figures)"
    for name in "${names[@]}" autoencoder ldm zero2; do
      [ -f "$WORK/rc/$name" ] || continue
      local rc; rc=$(cat "$WORK/rc/$name")
      [ "$rc" = 0 ] || failed=$((failed + 1))
      local log=$WORK/logs/$name.log
      printf '%-12s rc=%-5s %s\n' "$name" "$rc" "$(grep -m1 'distgen: speed:' "$log" 2>/dev/null | sed 's/^distgen: speed: //')"
      printf '%-12s          %s\n' "" "$(grep '^step ' "$log" 2>/dev/null | tail -n1)"
      [ "$rc" = 0 ] || { echo "   --- tail of $name.log:"; tail -n 5 "$log" 2>/dev/null | cut -c1-250 | sed 's/^/   /'; }
    done
    for name in "${names[@]}" autoencoder ae-export ldm; do
      echo; echo "################ $name.log (last 150 lines)"; tail -n 150 "$WORK/logs/$name.log" 2>/dev/null
    done
  } >"$OUT_DIR/families.log" 2>&1
  cp "$WORK/logs/zero2.log" "$OUT_DIR/zero2.log" 2>/dev/null
  if [ "$failed" = 0 ]; then status "STEP families+zero2 ok ($(( $(date +%s) - s ))s)"
  else status "STEP families+zero2 FAILED: $failed run(s) not ok ($(( $(date +%s) - s ))s)"; fi
}

# ------------------------------------------------------------------ f. evaluation feature extraction
step_evalfeat() {
  local t; t=$(cap 120 3)
  if [ "$t" -lt 30 ]; then status "STEP evalfeat SKIPPED (${t}s left)"; return 0; fi
  # distgen's reference-feature pass (InceptionV3, random weights as the tests make them) on this device
  LABEL=evalfeat-device run_step evalfeat "$t" "$PY" - "$FMNIST" "$WORK/evalfeat" "$EVAL_N" <<'EOF'
import itertools, json, sys, time
from pathlib import Path
import numpy as np, torch
from accelerate import PartialState
state = PartialState(cpu=not torch.cuda.is_available())
from distgen.config import DataConfig
from distgen.data import write_shards
from distgen.data.sources import open_source
from distgen.evaluate import EvalSpec, Evaluator
from distgen.evaluate.extractors import write_random_inception
src, work, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
work.mkdir(parents=True, exist_ok=True)
x = np.stack([i[0] for i in itertools.islice(open_source(f"fashion-mnist:{src}", "test").items(), n)])
np.savez(work / "m.npz", x=x)
write_shards(f"npz:{work / 'm.npz'}", work / "shards", "test", samples_per_shard=2500)
weights = write_random_inception(work / "inception-random.pth",
                                 images=torch.from_numpy(x[:24])[:, None].expand(-1, 3, -1, -1).contiguous())
dev = "cuda" if torch.cuda.is_available() else "cpu"
for rnd, bs in enumerate((256, 256, 512) if dev == "cuda" else (32,)):
    spec = EvalSpec(metrics=("fid", "kid"), ref=[str(work / "shards" / "test.manifest.json")], batch_size=bs,
                    inception_weights=str(weights), cache_dir=str(work / f"cache-{rnd}"))
    ev = Evaluator(spec, dev, log=lambda s: None)
    t0 = time.perf_counter()
    ref = ev.reference(DataConfig(resolution=28, channels=1, workers=4))
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({"device": dev, "round": rnd, "batch": bs, "images": ref.num, "seconds": round(dt, 2),
                      "images_per_s": round(ref.num / dt, 1), "cache": ref.cache}))
EOF
  # The CPU benchmark of the repo (1 vs 2 processes vs torch-fidelity); it reads Debian's Fashion-MNIST path.
  t=$(cap 90 3)
  if [ "$t" -lt 40 ]; then status "STEP evalfeat-cpu SKIPPED (${t}s left)"; return 0; fi
  if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    { mkdir -p /usr/share/datasets && ln -sfn "$FMNIST" /usr/share/datasets/fashion-mnist; } >>"$OUT_DIR/evalfeat.log" 2>&1 \
      || { status "STEP evalfeat-cpu SKIPPED (no /usr/share/datasets/fashion-mnist)"; return 0; }
  fi
  LABEL=evalfeat-cpu run_step evalfeat "$t" "$PY" benchmarks/eval_features.py --images "$EVALCPU_N" --threads 4
}

# ------------------------------------------------------------------ g. the memory table, one process
step_memory() {
  local t; t=$(cap 240 3)
  if [ "$t" -lt 60 ]; then status "STEP memory SKIPPED (${t}s left)"; return 0; fi
  run_step memory "$t" "$PY" benchmarks/memory.py "${MEM_ARGS[@]}" --nproc 1 --timeout $(( t / 3 ))
}

for s in $STEPS; do
  case $s in
    env) step_env ;; shard) step_shard ;; fm) step_fm ;; families) step_families ;; cifar) step_cifar ;;
    evalfeat) step_evalfeat ;; memory) step_memory ;; *) status "unknown step $s" ;;
  esac
done

wait_extra_shards

# ------------------------------------------------------------------ summary (stdout and OUT_DIR/summary.txt)
{
  # the step list last: the caller may see only the end of stdout
  show() { [ -f "$OUT_DIR/$1.log" ] && { echo; echo "---- $1.log (tail)"; tail -n "$2" "$OUT_DIR/$1.log" | cut -c1-250; }; }
  show env 18
  show shard 3
  show fm 9
  [ -f "$OUT_DIR/families.log" ] && { echo; echo "---- families.log (summary)"; sed -n '1,/^################/p' "$OUT_DIR/families.log" | grep -v '^################' | cut -c1-250; }
  show zero2 3
  show cifar 9
  show evalfeat 8
  show memory 24
  echo
  echo "======== gpu_session steps ($(elapsed)s of ${BUDGET}s; cpu_mode=$CPU; all logs in $OUT_DIR)"
  printf '%s\n' "${STATUS[@]}"
} 2>&1 | tee "$OUT_DIR/summary.txt"
