#!/usr/bin/env bash
# The GPU checks of issues #17 and #19 in one run (about 5 minutes on one H200, 9 at most), one
# JSON file per check under $OUT (default /tmp/gpu_checks) and a merged gpu_checks.json:
#   s2t  stage-2 throughput (issue #17): a Llama 3.2 1B shape (random init, bf16, torch.compile,
#        the report-vocabulary head), full fine-tuning and LoRA against a bare transformers+peft
#        loop on the same batches; each mode in its own process, retried eagerly if the compiled
#        run does not finish in time. The synthetic set of `loc` is written meanwhile (CPU only).
#   loc  stage-1 localisation benchmark (issue #19): today's classifier beside the localising
#        default, lesion crops with their reader's own phase (train.crop_epochs) and top-k
#        pooling, with extra seeds, rows trained side by side;
#   s1t  stage-1 throughput at 1024x512 (convnext_small) against bare timm, data loading included;
#   g270 stage-2 throughput of the Gemma 3 270M shape (report-vocabulary head, eager).
# Packages the image lacks travel as wheels in .whl/ (pydicom, omegaconf, and the versions of
# transformers, peft and timm the project is tested with): see docs/benchmarks.md.
# Usage: bash scripts/gpu_checks.sh   (CHECKS="s2t loc" by default)
# Issue #19 on one H200 in about 8 minutes: stage 1 at 1024x512 (stage1/gpu) beside the 256x128
# default, 16 epochs each, side by side, then the throughput at 1024x512:
#   CHECKS="loc s1t" ROWS="localise localise_1024" EPOCHS=16 LOC_LIMIT=420 PREP_WORKERS=14 \
#   S1T_EXAMS=128 S1T_WORKERS=14 S1T_LIMIT=150 bash scripts/gpu_checks.sh
# Dry run on a CPU: EXAMS=24 EPOCHS=1 S2T_SHAPE=tiny S2T_ARGS="--batch 2 --seq 128 --steps 4" bash scripts/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu_checks}
WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import torch, transformers, peft, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'timm', timm.__version__)" >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

CHECKS=${CHECKS:-s2t loc}
want() { case " $CHECKS " in *" $1 "*) return 0;; *) return 1;; esac; }
EXAMS=${EXAMS:-900}

# ROW or ROW:SEED (benchmarks/stage1_localisation.py --list); localise_1024 is stage1/gpu at 1024x512
ROWS=${ROWS:-today localise localise_pooled localise_topk localise:1 localise_pooled:1 localise:2 localise_pooled:2}
ROW_NAMES=$(for spec in $ROWS; do echo "${spec%%:*}"; done | sort -u | tr '\n' ' ')
if want loc; then  # the data set is CPU work: written while the GPU runs stage 2
  # shellcheck disable=SC2086
  python3 benchmarks/stage1_localisation.py --out "$WORK/loc" --exams "$EXAMS" --prepare-only --prep-workers "${PREP_WORKERS:-10}" \
    --rows $ROW_NAMES > "$WORK/prep.log" 2>&1 &
  prep=$!
fi

# one stage-2 throughput check: compiled first, eager if the compiled run gives no result in time
s2t() {
  local name=$1; shift
  timeout "${S2T_LIMIT:-120}" python3 benchmarks/stage2_throughput.py "$@" > "$OUT/$name.json" 2> "$WORK/$name.log"
  if ! grep -q '"benchmark"' "$OUT/$name.json"; then
    stamp "$name: no compiled result ($(tail -c 300 "$WORK/$name.log" | tr '\n' ' ')); eager"
    timeout "${S2T_EAGER_LIMIT:-60}" python3 benchmarks/stage2_throughput.py "$@" --no-compile > "$OUT/$name.json" 2> "$WORK/$name.eager.log" \
      || tail -c 400 "$WORK/$name.eager.log"
  fi
  cat "$OUT/$name.json"; echo
}

if want s2t; then
  SHAPE=${S2T_SHAPE:-llama-3.2-1b}
  ARGS=${S2T_ARGS:---batch 8 --seq 1024 --steps 10}
  stamp "stage-2 throughput: $SHAPE, full fine-tuning"
  # shellcheck disable=SC2086
  s2t stage2_llama1b_full --shape "$SHAPE" $ARGS --report-vocab 4000 --modes full --no-generate
  stamp "stage-2 throughput: $SHAPE, LoRA"
  # shellcheck disable=SC2086
  s2t stage2_llama1b_lora --shape "$SHAPE" $ARGS --report-vocab 4000 --modes lora --no-generate
fi

if want loc; then
  wait "$prep" || { echo "data set failed:"; tail -5 "$WORK/prep.log"; }
  stamp "stage-1 localisation: data ready"
  # each row is bounded (LOC_LIMIT seconds) so that the merge still runs
  for spec in $ROWS; do
    row=${spec%%:*}; seed=0; [ "$spec" != "$row" ] && seed=${spec##*:}
    timeout "${LOC_LIMIT:-150}" python3 benchmarks/stage1_localisation.py --out "$WORK/loc" --exams "$EXAMS" --epochs "${EPOCHS:-12}" \
      --rows "$row" --seed "$seed" --workers 1 --prep-workers 1 --result "result-$row-$seed.json" > "$WORK/$row-$seed.log" 2>&1 &
  done
  wait
  stamp "stage-1 localisation: rows done"
  python3 - "$WORK/loc" "$OUT/stage1_localisation.json" "${EPOCHS:-12}" $ROWS <<'EOF'
import json, sys
from pathlib import Path
folder, out, epochs, specs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
files = {s: folder / f"result-{s.split(':')[0]}-{s.split(':')[1] if ':' in s else 0}.json" for s in specs}
found = [json.loads(f.read_text())["rows"][0] for f in files.values() if f.exists()]
ref = next((r for r in found if r["row"] == "today"), None)
for r in found:
    if ref:
        r["ratio_birads_f1_vs_reference"] = round(r["birads_exam_macro_f1"] / max(ref["birads_exam_macro_f1"], 1e-9), 3)
result = {"benchmark": "stage1_localisation", "reference": "today", "epochs": epochs, "rows": found,
          "missing": [s for s, f in files.items() if not f.exists()]}
out.write_text(json.dumps(result))
print(json.dumps(result))
EOF
  for f in "$WORK"/*-[0-9].log; do grep -q '"benchmark"' "$f" || { echo "$f:"; tail -c 600 "$f"; echo; }; done > "$OUT/loc_failures.txt"
  cat "$OUT/loc_failures.txt"
fi

if want s1t; then
  stamp "stage-1 throughput 1024x512"
  timeout "${S1T_LIMIT:-80}" python3 benchmarks/stage1_throughput.py --exams "${S1T_EXAMS:-64}" --workers "${S1T_WORKERS:-8}" \
    > "$OUT/stage1_throughput.json" 2> "$WORK/s1t.log" || tail -5 "$WORK/s1t.log"
  cat "$OUT/stage1_throughput.json"
fi

if want g270; then
  stamp "stage-2 throughput: Gemma 3 270M shape"
  timeout "${S2T_LIMIT:-120}" python3 benchmarks/stage2_throughput.py --shape gemma-3-270m --report-vocab 4000 --batch 16 --seq 512 --steps 10 --no-compile \
    --no-generate > "$OUT/stage2_gemma270m.json" 2> "$WORK/g270.log" || tail -5 "$WORK/g270.log"
  cat "$OUT/stage2_gemma270m.json"
fi
stamp "done"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {}
for f in sorted(out.glob("*.json")):
    if f.name != "gpu_checks.json":
        try:
            merged[f.stem] = json.loads(f.read_text())
        except ValueError:
            merged[f.stem] = None
(out / "gpu_checks.json").write_text(json.dumps(merged))
EOF
