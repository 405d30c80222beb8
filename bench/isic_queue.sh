#!/usr/bin/env bash
# The ISIC 2017 benchmark queue behind the README's strategy tables (issue 8). Every step is
# resumable: rerun this script after an interruption and finished runs are skipped.
# Usage: nohup bash bench/isic_queue.sh [SEEDS] > exp/isic_queue.log 2>&1 &
#   SEEDS: comma-separated, default 0,1,2 (the README tables name the seeds that finished)
#   STEPS: space-separated subset of "compare main noisy" (default "compare")
#   STRATEGIES: comparison rows (default below); FULL=0 skips full supervision. On a shared
#     machine two copies with disjoint STRATEGIES (and FULL=1 in one) can run at once; they share
#     the initial model, so start the second once init-s<seed>/round_00/DONE exists.
#   EXP_DIR: where runs go (default exp/). To run a fixed commit while the tree changes:
#     git archive HEAD | tar -x -C /tmp/snap && EXP_DIR=$PWD/exp bash /tmp/snap/bench/isic_queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${ISIC_DATA:-$(realpath -m ../shared/data/isic2017)}
SEEDS=${1:-0,1,2}
STEPS=${STEPS:-compare}
EXP_DIR=${EXP_DIR:-exp}
COMMON=(--preset isic2017-cpu --data "$DATA" --exp-dir "$EXP_DIR" --no-progress)
dsal() { python -m dsal_tf.cli "$@"; }  # this checkout's package, not whichever one is installed
NAME=compare-isic2017-cpu-v2
# DSAL and random first (the headline difference), then the rest; full supervision ends each seed.
# Every row uses its own weak labeler (CEAL: ceal bins; the others: DSAL's confidence rule).
STRATEGIES=${STRATEGIES-dsal,random,dsal+diverse,ceal,entropy}  # STRATEGIES= : full supervision only
FULL=${FULL:-1}
if [ "$FULL" = 1 ]; then FULL_OPT=--full-supervision; else FULL_OPT=--no-full-supervision; fi

for step in $STEPS; do
  case $step in
    compare)
      for seed in ${SEEDS//,/ }; do
        dsal compare "${COMMON[@]}" --strategies "$STRATEGIES" --seeds "$seed" --name "$NAME" \
          --baseline random "$FULL_OPT"
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
