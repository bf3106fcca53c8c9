#!/usr/bin/env bash
# Every GPU check of this wave in one run (about 8 minutes on one H200), one JSON file per check
# under $OUT (default /tmp/gpu_checks) and a merged gpu_checks.json:
#   1. stage-1 localisation benchmark (issue #19): today's classifier beside the localising one,
#      MIL pooling ablation, lesion features and the learning curve, rows trained side by side;
#   2. stage-1 throughput at 1024x512 (convnext_small) against bare timm, data loading included;
#   3. stage-2 throughput (issue #17): Gemma 3 270M and 1B shapes and the Llama 3.2 1B shape,
#      LoRA and full fine-tuning against a bare transformers+peft loop.
# Packages the image lacks travel as wheels in .whl/ (pydicom, omegaconf): see docs/benchmarks.md.
# Usage: bash scripts/gpu_checks.sh   (dry run on a CPU: EXAMS=24 EPOCHS=1 CHECKS=loc bash scripts/gpu_checks.sh)
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
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

CHECKS=${CHECKS:-loc s1t s2t}
want() { case " $CHECKS " in *" $1 "*) return 0;; *) return 1;; esac; }

if want loc; then
stamp "stage-1 localisation: data"
python3 benchmarks/stage1_localisation.py --out "$WORK/loc" --exams "${EXAMS:-900}" --prepare-only --prep-workers 14 > "$WORK/prep.log" 2>&1 || tail -5 "$WORK/prep.log"
ROWS=${ROWS:-today localise localise_lesion localise_topk localise_attention localise_no_box_loss curve_150 curve_360 curve_700}
# each row is bounded (LOC_LIMIT seconds) so that the throughput checks and the merge still run
for row in $ROWS; do
  timeout "${LOC_LIMIT:-280}" python3 benchmarks/stage1_localisation.py --out "$WORK/loc" --exams "${EXAMS:-900}" --epochs "${EPOCHS:-16}" --rows "$row" --workers 1 --prep-workers 1 \
    --result "$row.json" > "$WORK/$row.log" 2>&1 &
done
wait
stamp "stage-1 localisation: rows done"
python3 - "$WORK/loc" "$OUT/stage1_localisation.json" $ROWS <<'EOF'
import json, sys
from pathlib import Path
folder, out, rows = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
found = [json.loads((folder / f"{r}.json").read_text())["rows"][0] for r in rows if (folder / f"{r}.json").exists()]
ref = next((r for r in found if r["row"] == "today"), None)
for r in found:
    if ref:
        r["ratio_birads_f1_vs_reference"] = round(r["birads_exam_macro_f1"] / max(ref["birads_exam_macro_f1"], 1e-9), 3)
result = {"benchmark": "stage1_localisation", "reference": "today", "epochs": int(__import__("os").environ.get("EPOCHS", 16)), "rows": found,
          "missing": [r for r in rows if not (folder / f"{r}.json").exists()]}
out.write_text(json.dumps(result))
print(json.dumps(result))
EOF
for row in $ROWS; do [ -f "$WORK/loc/$row.json" ] || { echo "row $row failed:"; tail -c 600 "$WORK/$row.log"; echo; }; done > "$OUT/loc_failures.txt"
cat "$OUT/loc_failures.txt"
fi

if want s1t; then
stamp "stage-1 throughput 1024x512"
timeout "${S1T_LIMIT:-80}" python3 benchmarks/stage1_throughput.py --exams 64 --workers 8 > "$OUT/stage1_throughput.json" 2> "$WORK/s1t.log" || tail -5 "$WORK/s1t.log"
cat "$OUT/stage1_throughput.json"
fi

if want s2t; then
stamp "stage-2 throughput: Gemma 3 270M"
timeout "${S2T_LIMIT:-150}" python3 benchmarks/stage2_throughput.py --shape gemma-3-270m --report-vocab 4000 --batch 16 --seq 512 --steps 10 --no-compile \
  --no-generate > "$OUT/stage2_gemma270m.json" 2> "$WORK/g270.log" || tail -5 "$WORK/g270.log"
cat "$OUT/stage2_gemma270m.json"
stamp "stage-2 throughput: Gemma 3 1B shape"
timeout "${S2T_LIMIT:-150}" python3 benchmarks/stage2_throughput.py --shape gemma-3-1b --report-vocab 4000 --batch 8 --seq 1024 --steps 10 --no-compile \
  --no-generate > "$OUT/stage2_gemma1b.json" 2> "$WORK/g1b.log" || tail -5 "$WORK/g1b.log"
cat "$OUT/stage2_gemma1b.json"
stamp "stage-2 throughput: Llama 3.2 1B shape"
timeout "${S2T_LIMIT:-150}" python3 benchmarks/stage2_throughput.py --shape llama-3.2-1b --report-vocab 4000 --batch 8 --seq 1024 --steps 10 --no-compile \
  > "$OUT/stage2_llama1b.json" 2> "$WORK/l1b.log" || tail -5 "$WORK/l1b.log"
cat "$OUT/stage2_llama1b.json"
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
