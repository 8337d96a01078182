#!/usr/bin/env bash
# The prepared GPU check, for one NVIDIA H100/H200 with jax (CUDA) preinstalled and no package index:
#
#     bash bench/gpu_check.sh
#
# from anywhere (it works in the repository root). In order, each part under `timeout` and a shared budget
# (GPU_CHECK_BUDGET_S, default 540 s: a part gets at most what is left, and a part that would get under 20 s
# is skipped), continuing past a failed part:
#   install            pip install --no-deps --no-build-isolation -e . (quiet); if harli_jax.kernels then does
#                      not import from this checkout, a PYTHONPATH shim of links to harli_jax/ and kernels/
#   device             nvidia-smi -L, jax/jaxlib versions, jax.devices(), the result files' device suffix
#   kernel-tests       pytest -q tests/kernels (on a GPU the decode kernel tests and the `impl="pallas"` calls
#                      of the ragged ones compile the Triton kernels; the ragged kernel tests that pass
#                      interpret=True run interpreted)
#   paged-attention    bench/paged_attention.py: decode (our Pallas kernel, jax.experimental.pallas.ops.gpu
#                      paged_attention, the reference) and the ragged mixed step (Pallas kernel vs reference)
#   layer-weights      bench/layer_weights.py at Llama-3-8B shapes: per-layer arrays (paged_step) and
#                      stacked + scan, batches 1 8 32 128 at context 512
#   layer-weights-dsf  the same stacked + scan in a second process under
#                      XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true
#   fused              bench/fused.py in bf16 on small.yaml: the row-cost curve out to 1,024 rows (the GPU's ridge)
#                      and what each fused shape (forward window, token chunk, backward slice) adds to a decode
#                      step per token-layer against the same work as a micro-step
#   kernel-tests-f32-highest
#                      only if kernel tests failed: the failed ones again with JAX_DEFAULT_MATMUL_PRECISION=highest
#                      (Pallas Triton dots of float32 inputs use TF32 unless asked otherwise: a failure that
#                      goes away here is TF32 rounding, not a wrong kernel)
# then prints a summary and exits 0 whatever failed (the summary names what failed).
#
# Results: <results>/paged_attention-<gpu>.json, layer_weights-<gpu>.json, layer_weights-dsf-<gpu>.json,
# fused-<gpu>.json (written by bench/common.py: machine, JAX version, commit, date, load), gpu_check-<gpu>.json
# (this run's parts, test counts and the summary tables) and gpu_check-<gpu>-logs.tar.gz (every part's log, the
# JUnit XML of the tests); <results> is bench/results (GPU_CHECK_RESULTS overrides). Where $OUT names a folder
# (the device tool's folder of files to bring back) those six files are copied there too.
#
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_RESULTS, GPU_CHECK_FORCE=1 (run the GPU parts
# even when jax's backend is not gpu), GPU_CHECK_SMOKE=1 (a CPU smoke run of this script: no install, tiny
# shapes, one kernel test file, results into a temporary folder unless GPU_CHECK_RESULTS is set).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 0
REPO=$(pwd -P)
PY=${PYTHON:-$(command -v python3 || command -v python)}
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
KILL_GRACE_S=15  # after a part's limit, SIGTERM (the benchmarks then write what they have), then SIGKILL
RESERVE_S=15     # kept for the summary
MIN_PART_S=20
export PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
  RESULTS=${GPU_CHECK_RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_smoke.XXXXXX")}
else
  RESULTS=${GPU_CHECK_RESULTS:-$REPO/bench/results}
fi
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd -P)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")
PARTS_FILE=$LOGS/parts.tsv
: >"$PARTS_FILE"

say() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

record() {  # name status rc seconds limit
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$PARTS_FILE"
}

LAST_RC=
run_part() {  # name cap_seconds command...: runs it under timeout into $LOGS/<name>.log, records the status
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - SECONDS - RESERVE_S - KILL_GRACE_S))
  local limit=$((cap < left ? cap : left))
  if ((limit < MIN_PART_S)); then
    say "$name: SKIPPED: $((left > 0 ? left : 0)) s of the ${BUDGET_S} s budget left"
    record "$name" "skipped (budget)" "" 0 0
    LAST_RC=skipped
    return
  fi
  local shown="$*"
  shown=${shown//$'\n'/; }
  say "== $name (limit ${limit} s): ${shown:0:300}"
  local start=$SECONDS rc status
  timeout -k "$KILL_GRACE_S" "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT" ;;
    *) status=FAILED ;;
  esac
  say "$name: $status (exit $rc) after $((SECONDS - start)) s"
  if ((rc != 0)); then
    tail -n 12 "$LOGS/$name.log" | cut -c1-220 | sed 's/^/    | /'
  fi
  record "$name" "$status" "$rc" "$((SECONDS - start))" "$limit"
  LAST_RC=$rc
}

skip_part() {  # name reason
  say "$1: SKIPPED: $2"
  record "$1" "skipped ($2)" "" 0 0
}

say "gpu_check: repo $REPO, python $PY, budget ${BUDGET_S} s, results into $RESULTS, logs in $LOGS"

# 1. Install and device ----------------------------------------------------------------------------------------

IMPORT_CHECK="import os, sys, harli_jax.kernels as k, harli_jax.model as m
root = os.path.realpath(sys.argv[1])
for mod in (k, m):
    assert os.path.realpath(mod.__file__).startswith(root + os.sep), f'{mod.__name__} is {mod.__file__}, not in {root}'
print('harli_jax imports from', root)"

if [ "$SMOKE" = 1 ]; then
  skip_part install "smoke run: the checkout's environment as it is"
else
  run_part install 90 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
if ! (cd / && "$PY" -c "$IMPORT_CHECK" "$REPO") >>"$LOGS/install.log" 2>&1; then
  # harli_jax.kernels is the kernels/ folder (pyproject's package-dir): a plain PYTHONPATH does not give it.
  SHIM=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_shim.XXXXXX")
  mkdir "$SHIM/harli_jax"
  for entry in "$REPO"/harli_jax/*; do ln -s "$entry" "$SHIM/harli_jax/"; done
  ln -s "$REPO/kernels" "$SHIM/harli_jax/kernels"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  if (cd / && "$PY" -c "$IMPORT_CHECK" "$REPO") >>"$LOGS/install.log" 2>&1; then
    say "install: harli_jax did not import from the checkout; using the PYTHONPATH shim $SHIM"
    record install-shim "ok (PYTHONPATH shim)" 0 0 0
  else
    say "install: harli_jax does not import, not even through a PYTHONPATH shim (see install.log)"
    record install-shim FAILED 1 0 0
  fi
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 20 nvidia-smi -L 2>&1 | sed 's/^/    /'
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2>&1 | sed 's/^/    /'
else
  say "no nvidia-smi on PATH"
fi
DEVICE_PY="import sys
sys.path.insert(0, 'bench')
import jax, jaxlib
import common
d = jax.devices()
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'backend', jax.default_backend())
print('devices', d)
stats = d[0].memory_stats() or {}
print('device_kind', d[0].device_kind, 'bytes_limit', stats.get('bytes_limit'))
print('BACKEND=' + jax.default_backend())
print('SLUG=' + common.device_name())"
run_part device 60 "$PY" -c "$DEVICE_PY"
touch "$LOGS/device.log"
grep -v -E '^(BACKEND|SLUG)=' "$LOGS/device.log" | tail -n 6 | cut -c1-300 | sed 's/^/    /'
BACKEND=$(sed -n 's/^BACKEND=//p' "$LOGS/device.log" | tail -n 1)
SLUG=$(sed -n 's/^SLUG=//p' "$LOGS/device.log" | tail -n 1)
BACKEND=${BACKEND:-unknown}
SLUG=${SLUG:-unknown-device}
say "backend $BACKEND; result files end in -$SLUG.json"

GPU_OK=1
if [ "$BACKEND" != gpu ] && [ "$SMOKE" != 1 ] && [ "${GPU_CHECK_FORCE:-0}" != 1 ]; then
  GPU_OK=0
fi

# 2-4. Kernel tests and benchmarks ---------------------------------------------------------------------------

if [ "$SMOKE" = 1 ]; then
  PYTEST_TARGETS=(tests/kernels/test_write_kv.py)
  PA_ARGS=(--quick --batch 1 --context 64 --ragged-prefill 1 --ragged-context 64)
  LW_ARGS=(--model configs/models/tiny.yaml --dtype bfloat16 --batches 1 2 --context 40 --steps 3 --repeats 2
    --copy-mib 16 --compile-threads 2)
  FUSED_ARGS=(--quick --dtype bfloat16)
else
  PYTEST_TARGETS=(tests/kernels)
  # Decode: 6 cases x 3 impls; ragged: 32 sequences, 8 or all 32 of them with a 64-token chunk, the rest one
  # decode token, at contexts 2048 and 8192 (4 cases x 2 impls).
  PA_ARGS=(--batch 1 32 128 --context 2048 8192 --iters 20 --repeats 5 --check-seqs 4
    --ragged-batch 32 --ragged-chunk 64 --ragged-prefill 8 32 --ragged-context 2048 8192)
  # Llama-3-8B, bf16 (16 GB of weights; 30 GB with the stacked copy), 4 batches x 2 variants = 8 programs,
  # compiled 4 at a time; 3 interleaved rounds of 10 steps.
  LW_ARGS=(--model configs/models/llama3-8b.yaml --dtype bfloat16 --batches 1 8 32 128 --context 512 --steps 10
    --repeats 3 --copy-mib 2048 --compile-threads 4)
  FUSED_ARGS=(--dtype bfloat16 --rows 1,8,32,64,128,256,512,1024 --batches 1,4,8,16,32 --rounds 2)
fi
# The GPU machine's CPUs are not the bottleneck: a looser load threshold, one retry, no waiting for quiet.
LOAD_ARGS=(--max-other-share 0.25 --max-retries 1 --quiet-timeout 0 --quiet-sample 1 --out "$RESULTS")
LW_ARGS+=("${LOAD_ARGS[@]}")
FUSED_ARGS+=("${LOAD_ARGS[@]}")
PYTEST_ARGS=(-q -o "cache_dir=$LOGS/pytest-cache")
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_ARGS+=(--timeout=90)  # one hung test must not take the whole part
fi
PYTEST_ENV=()
if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  # 4 pytest workers compile at once (the part is compile-bound); each JAX process then allocates GPU memory as
  # it goes instead of taking 75% of it at start.
  PYTEST_ARGS+=(-n 4)
  PYTEST_ENV=(XLA_PYTHON_CLIENT_PREALLOCATE=false)
fi
DSF_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_dynamic_slice_fusion=true"

TESTS_RC=
if ((GPU_OK)); then
  run_part kernel-tests 110 env ${PYTEST_ENV[@]+"${PYTEST_ENV[@]}"} "$PY" -P -m pytest "${PYTEST_ARGS[@]}" \
    --junitxml="$LOGS/kernel-tests.xml" "${PYTEST_TARGETS[@]}"
  TESTS_RC=$LAST_RC
  run_part paged-attention 100 "$PY" bench/paged_attention.py --out "$RESULTS" "${PA_ARGS[@]}"
  run_part layer-weights 160 "$PY" bench/layer_weights.py "${LW_ARGS[@]}" --variants per-layer-arrays stacked-scan
  run_part layer-weights-dsf 75 env XLA_FLAGS="$DSF_FLAGS" "$PY" bench/layer_weights.py "${LW_ARGS[@]}" \
    --variants stacked-scan --xla-flags-label dsf
  run_part fused 90 "$PY" bench/fused.py "${FUSED_ARGS[@]}"
  if [ "$TESTS_RC" = 1 ]; then  # pytest: 1 = some tests failed
    run_part kernel-tests-f32-highest 40 env ${PYTEST_ENV[@]+"${PYTEST_ENV[@]}"} JAX_DEFAULT_MATMUL_PRECISION=highest \
      "$PY" -P -m pytest \
      "${PYTEST_ARGS[@]}" --lf --junitxml="$LOGS/kernel-tests-f32-highest.xml" "${PYTEST_TARGETS[@]}"
  fi
else
  for part in kernel-tests paged-attention layer-weights layer-weights-dsf fused; do
    skip_part "$part" "jax backend is $BACKEND, not gpu (GPU_CHECK_FORCE=1 runs it anyway)"
  done
fi

# 5. Summary ---------------------------------------------------------------------------------------------------

cat >"$LOGS/summary.py" <<'PYEOF'
"""Prints the summary of a gpu_check run and writes gpu_check-<device>.json."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

results, logs, slug, budget, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
summary = {"device_suffix": slug, "budget_s": int(budget), "elapsed_s": int(elapsed), "results_dir": str(results)}


def load(name):
    try:
        return json.loads((results / f"{name}-{slug}.json").read_text())
    except (OSError, ValueError):
        return None


def fmt(x, scale=1.0, digits=1, unit=""):
    return "-" if x is None else f"{x * scale:.{digits}f}{unit}"


parts = []
for line in (logs / "parts.tsv").read_text().splitlines():
    name, status, rc, seconds, limit = line.split("\t")
    parts.append({"part": name, "status": status, "exit": rc, "seconds": int(seconds), "limit_s": int(limit)})
summary["parts"] = parts
print("parts:")
for p in parts:
    print(f"  {p['part']:<26} {p['status']:<20} {p['seconds']:4d} s (limit {p['limit_s']} s)")

tests = {}
for label in ("kernel-tests", "kernel-tests-f32-highest"):
    path = logs / f"{label}.xml"
    if not path.exists():
        continue
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        tests[label] = {"error": str(error)}
        continue
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    tests[label] = {**count, "failed": failed}
    print(f"{label}: {count['tests']} tests, {count['failures']} failed, {count['errors']} errors, "
          f"{count['skipped']} skipped")
    for name in failed[:12]:
        print(f"    failed: {name}")
    if len(failed) > 12:
        print(f"    ... and {len(failed) - 12} more")
summary["tests"] = tests

pa = load("paged_attention")
if pa is not None:
    copy = (pa.get("copy_bandwidth") or {}).get("bytes_per_s")
    print(f"paged attention (jax {pa.get('jax_version')}, copy {fmt(copy, 1e-9, 0, ' GB/s')}"
          + (", INCOMPLETE" if pa.get("incomplete") else "") + "): time, % of copy bandwidth, max err vs f64")
    table = []
    for r in pa.get("results", []):
        cell = r.get("error") or (f"{r['seconds'] * 1e6:8.1f} us {100 * r['share_of_copy_bandwidth']:5.1f}%  "
                                  f"err {r['max_abs_err_vs_dense_f64']:.1e}")
        table.append({k: r.get(k) for k in ("impl", "batch", "context", "seconds", "share_of_copy_bandwidth",
                                              "max_abs_err_vs_dense_f64", "max_abs_err_vs_reference", "error")})
        print(f"  decode {r['impl']:>10} batch {r['batch']:4d} ctx {r['context']:5d}: {cell[:150]}")
    summary["paged_attention_decode"] = table
    table = []
    for r in (pa.get("ragged") or {}).get("results", []):
        if "impl" not in r:
            print(f"  ragged: {r.get('error')}")
            table.append(r)
            continue
        cell = r.get("error") or (
            f"{r['seconds'] * 1e6:8.1f} us {100 * r['share_of_copy_bandwidth']:5.1f}% "
            f"{r['flops_per_s'] / 1e12:6.1f} TFLOP/s  err {r['max_abs_err_vs_dense_f64']:.1e}"
            + (f" (vs ref {r['max_abs_err_vs_reference']:.1e})" if "max_abs_err_vs_reference" in r else "")
            + ("" if r.get("padding_rows_zero", True) else "  PADDING ROWS NOT ZERO"))
        table.append({k: r.get(k) for k in ("impl", "prefill_seqs", "chunk", "decode_seqs", "context", "seconds",
                                              "share_of_copy_bandwidth", "flops_per_s", "max_abs_err_vs_dense_f64",
                                              "max_abs_err_vs_reference", "padding_rows_zero", "error")})
        print(f"  ragged {r['impl']:>9} {r['prefill_seqs']:3d}x{r['chunk']} + {r['decode_seqs']:3d}x1 "
              f"ctx {r['context']:5d}: {cell[:150]}")
    summary["paged_attention_ragged"] = table

lw, dsf = load("layer_weights"), load("layer_weights-dsf")
if lw is not None or dsf is not None:
    print("layer weights: decode step ms per-layer / stacked-scan / stacked-scan+DSF; floors ms weights-only; "
          "weights+K/V; compile s; weight-shaped fusion outputs in the scan's HLO (materialized slices)")
    for data, label in ((lw, "default XLA flags"), (dsf, "dsf")):
        if data is not None:
            bw = (data.get("copy_bandwidth") or {}).get("median")
            print(f"  {label}: jax {data.get('jax_version')}, XLA_FLAGS {data['config'].get('xla_flags')!r}, "
                  f"copy {fmt(bw, 1e-9, 0, ' GB/s')}, weights made in {fmt(data.get('init_s'))} s, "
                  f"{len(data.get('programs', {}))} programs compiled in {fmt(data.get('compile_wall_s'))} s"
                  + (", INCOMPLETE" if data.get("incomplete") else ""))
    rows = {}
    for data, label in ((lw, ""), (dsf, "+dsf")):
        data = data or {}
        for r in data.get("results", []):
            row = rows.setdefault(r["batch"], {"batch": r["batch"]})
            for v in ("per-layer-arrays", "stacked-scan"):
                if v in r:
                    row[v + label] = r[v]["median"]
            row.setdefault("floor_s", data.get("memory_floor_s"))  # the first run's (the default flags')
            row.setdefault("floor_with_kv_s", r.get("memory_floor_with_kv_s"))
        for key, prog in data.get("programs", {}).items():
            v, b = key.rsplit("@", 1)
            row = rows.setdefault(int(b), {"batch": int(b)})
            row["compile_s " + v + label] = prog.get("compile_s")
            hlo = prog.get("hlo") or {}
            row["hlo " + v + label] = {k: hlo.get(k) for k in ("weight_shaped_fusion_output",
                                                              "weight_shaped_dynamic_slice",
                                                              "address_computation_mentions")}
            if prog.get("error"):
                row["error " + v + label] = prog["error"]
    for b in sorted(rows):
        r = rows[b]

        def ms(k):
            return fmt(r.get(k), 1e3, 2)

        def cs(k):
            return fmt(r.get("compile_s " + k), 1.0, 0)

        fused = (r.get("hlo stacked-scan") or {}).get("weight_shaped_fusion_output")
        fused_dsf = (r.get("hlo stacked-scan+dsf") or {}).get("weight_shaped_fusion_output")
        print(f"  batch {b:4d}: {ms('per-layer-arrays')} / {ms('stacked-scan')} / {ms('stacked-scan+dsf')}  "
              f"floors {ms('floor_s')}; {ms('floor_with_kv_s')}  compile {cs('per-layer-arrays')} / "
              f"{cs('stacked-scan')} / {cs('stacked-scan+dsf')}  fusion outputs {fused} / {fused_dsf}")
        for k in r:
            if k.startswith("error "):
                print(f"    {k}: {r[k][:150]}")
    summary["layer_weights"] = [rows[b] for b in sorted(rows)]

fused = load("fused")
if fused is not None:
    fs = fused["summary"]
    fit = fs.get("row_cost_fit") or {}
    print(f"fused ({fused['model']['dtype']}): row-cost ridge ~{fmt(fit.get('ridge_rows'), digits=0)} rows; "
          "per decode batch, what a fused shape adds per token-layer over the micro-step's:")
    rows = {}
    for b, row in fs["per_decode_batch"].items():
        rows[b] = {k: v.get("vs_layer_micro_forward", v.get("vs_layer_micro_backward")) for k, v in row["fused"].items()}
        print(f"  batch {b:>3}: " + ", ".join(f"{k} x{fmt(v, digits=2)}" for k, v in rows[b].items()))
    summary["fused"] = {"ridge_rows": fit.get("ridge_rows"), "vs_micro_step": rows}

bad = [p for p in parts if not (p["status"].startswith("ok") or p["status"].startswith("skipped (smoke"))]
summary["not_ok"] = [p["part"] for p in bad]
path = results / f"gpu_check-{slug}.json"
path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(f"wrote {path}")
print("gpu_check: all parts ok" if not bad else
      "gpu_check: NOT OK: " + ", ".join(f"{p['part']} ({p['status']})" for p in bad))
PYEOF
echo
say "== summary"
timeout 60 "$PY" "$LOGS/summary.py" "$RESULTS" "$LOGS" "$SLUG" "$BUDGET_S" "$SECONDS" 2>&1 | cut -c1-400
if [ "${PIPESTATUS[0]}" != 0 ]; then
  say "the summary failed (the result files and logs are still there)"
fi

TARBALL=$RESULTS/gpu_check-$SLUG-logs.tar.gz
tar -czf "$TARBALL" --exclude=pytest-cache -C "$LOGS" . 2>/dev/null || say "could not write $TARBALL"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [ "$(cd "$OUT" && pwd -P)" != "$RESULTS" ]; then
  for f in paged_attention layer_weights layer_weights-dsf fused gpu_check; do
    [ -f "$RESULTS/$f-$SLUG.json" ] && cp "$RESULTS/$f-$SLUG.json" "$OUT/"
  done
  [ -f "$TARBALL" ] && cp "$TARBALL" "$OUT/"
  say "copied the result files and the logs to \$OUT ($OUT)"
fi
say "done in ${SECONDS} s; results in $RESULTS, logs in $TARBALL"
exit 0
