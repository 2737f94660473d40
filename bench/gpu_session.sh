#!/usr/bin/env bash
# The GPU checks of issues 3 and 5 in one call on a lent device machine (torch preinstalled there).
# Expects the CIFAR-10 tarball in .devdata/ and a protobuf wheel in .whl/ (both git-ignored, carried by
# the call). PART picks what runs, in its order (default: all, about 14 minutes on an H200):
#   speed    growth overhead, concurrency K=1,2,4,8 (processes, grouped, threads), batched counterfactual,
#            bf16 and torch.compile against fp32 eager
#   compare  the end-to-end 40-epoch, 5-seed comparison (static, heuristic, from-scratch)
#   ppo      PPO on CIFAR-10 for PPO_S seconds, then its policy against heuristic and static on held-out seeds
set -uo pipefail
export PYTHONUNBUFFERED=1 ESPER_DATA_DIR=$PWD/.devdata ESPER_CACHE_DIR=/tmp/esper-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/libs
OUT=${OUT:-/tmp}
PART=${PART:-compare speed ppo}
nvidia-smi -L
python3 -c "from esper.tolaria.data import load_cifar10; d = load_cifar10(None); print('data', d.train_x.shape)"
for part in $PART; do
case $part in
speed)
  timeout 70 python3 bench/growth_overhead.py --device cuda --steps 200
  for mechanism in processes grouped threads; do
    timeout 100 python3 bench/concurrency.py --device cuda --k 1 2 4 8 --steps 300 --mechanism $mechanism
  done
  timeout 60 python3 bench/counterfactual_eval.py --device cuda
  timeout 150 python3 bench/fast_path.py --device cuda --steps 200
  ;;
compare)
  start=$SECONDS
  timeout "${COMPARE_TIMEOUT:-380}" python3 -m esper.cli compare --task cifar10 --max-epochs 40 --max-batches 0 \
    --seeds 5 --workers 10 --gpu-preload --out /tmp/cmp
  echo "compare exit $? wall $((SECONDS - start)) s"
  mkdir -p "$OUT/compare" && cp /tmp/cmp/results.md /tmp/cmp/results.json /tmp/cmp/*.png "$OUT/compare/"
  ;;
ppo)
  # Rounds of 8 episodes (seeds 42, 43, ...), an update per round, a checkpoint after each; cut at PPO_S.
  timeout "${PPO_S:-230}" python3 -m esper.cli train ppo --task cifar10 --max-epochs 20 --max-batches 100 \
    --episodes 64 --n-envs 8 --update-every 1 --gpu-preload --runs-dir /tmp/ppo --telemetry-level minimal
  policy=$(ls /tmp/ppo/*/checkpoint.pt | head -1)
  cp "$policy" "$OUT/tamiyo_cifar10.pt"
  start=$SECONDS
  timeout 150 python3 -m esper.cli compare --task cifar10 --max-epochs 20 --max-batches 100 --seeds 5 --seed 1000 \
    --workers 15 --gpu-preload --arms static heuristic --policy "$policy" --out /tmp/cmpppo
  echo "compare_ppo exit $? wall $((SECONDS - start)) s"
  mkdir -p "$OUT/compare_ppo" && cp /tmp/cmpppo/results.md /tmp/cmpppo/results.json /tmp/cmpppo/*.png "$OUT/compare_ppo/"
  ;;
*) echo "unknown PART $part (speed, compare, ppo)"; exit 2 ;;
esac
done
