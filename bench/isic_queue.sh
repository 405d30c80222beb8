#!/usr/bin/env bash
# The ISIC 2017 benchmark queue behind the README's results tables. Every step is resumable:
# rerun this script after an interruption and finished runs are skipped.
# Usage: bash bench/isic_queue.sh [SEEDS]   (default 0; the README tables name the seeds used)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${ISIC_DATA:-../shared/data/isic2017}
SEEDS=${1:-0}
COMMON=(--preset isic2017-cpu --data "$DATA" --no-progress)

# issue 2: DSAL with the isic2017-cpu preset through the user entry points
python main.py "${COMMON[@]}"
python test.py --preset isic2017-cpu --data "$DATA"
# issue 3: strategies side by side (DSAL and random first, then the rest), plus full supervision
dsal compare "${COMMON[@]}" --strategies dsal,random --seeds "$SEEDS" --name compare-isic2017-cpu
dsal compare "${COMMON[@]}" --strategies dsal,random,entropy,ceal --seeds "$SEEDS" --name compare-isic2017-cpu
# issue 4: noisy teacher with 200 expert labels
dsal noisy-teacher "${COMMON[@]}" --experts 200 --seeds "$SEEDS"
python bench/collect_results.py
