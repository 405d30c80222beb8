#!/usr/bin/env bash
# The ISIC 2017 benchmark queue behind the README's strategy tables (issue 8). Every step is
# resumable: rerun this script after an interruption and finished runs are skipped.
# Usage: nohup bash bench/isic_queue.sh [SEEDS] > exp/isic_queue.log 2>&1 &
#   SEEDS: comma-separated, default 0,1,2 (the README tables name the seeds that finished)
#   STEPS: space-separated subset of "compare main noisy" (default "compare main")
#   EXP_DIR: where runs go (default exp/). To run a fixed commit while the tree changes:
#     git archive HEAD | tar -x -C /tmp/snap && EXP_DIR=$PWD/exp bash /tmp/snap/bench/isic_queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${ISIC_DATA:-$(realpath -m ../shared/data/isic2017)}
SEEDS=${1:-0,1,2}
STEPS=${STEPS:-compare main}
EXP_DIR=${EXP_DIR:-exp}
COMMON=(--preset isic2017-cpu --data "$DATA" --exp-dir "$EXP_DIR" --no-progress)
dsal() { python -m dsal_tf.cli "$@"; }  # this checkout's package, not whichever one is installed
NAME=compare-isic2017-cpu-v2
# DSAL and random first (the headline difference), then the rest; full supervision ends each seed.
# Every row uses its own weak labeler (CEAL: ceal bins; the others: DSAL's confidence rule).
STRATEGIES=dsal,random,dsal+diverse,ceal,entropy

for step in $STEPS; do
  case $step in
    compare)
      for seed in ${SEEDS//,/ }; do
        dsal compare "${COMMON[@]}" --strategies "$STRATEGIES" --seeds "$seed" --name "$NAME" --baseline random
        EXP_DIR=$EXP_DIR python bench/collect_results.py
      done ;;
    main)  # DSAL through the user entry points (seed 0)
      python main.py "${COMMON[@]}" --exp isic2017-cpu-dsal-s0
      python test.py --preset isic2017-cpu --data "$DATA" --exp-dir "$EXP_DIR" --exp isic2017-cpu-dsal-s0
      EXP_DIR=$EXP_DIR python bench/collect_results.py ;;
    noisy)  # noisy teacher with 200 expert labels
      dsal noisy-teacher "${COMMON[@]}" --experts 200 --seeds "$SEEDS"
      EXP_DIR=$EXP_DIR python bench/collect_results.py ;;
  esac
done
