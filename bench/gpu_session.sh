#!/usr/bin/env bash
# Issue 3's GPU checks in one call on a lent device machine (torch preinstalled there). Expects the
# CIFAR-10 tarball in .devdata/ and a protobuf wheel in .whl/ (both git-ignored, carried by the call):
#   growth overhead, concurrency K=1,2,4,8, and the end-to-end 40-epoch, 5-seed comparison.
set -uo pipefail
export PYTHONUNBUFFERED=1 ESPER_DATA_DIR=$PWD/.devdata ESPER_CACHE_DIR=/tmp/esper-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/libs
nvidia-smi -L
python3 -c "from esper.tolaria.data import load_cifar10; d = load_cifar10(None); print('data', d.train_x.shape)"
timeout 70 python3 bench/growth_overhead.py --device cuda --steps 200
timeout 100 python3 bench/concurrency.py --device cuda --k 1 2 4 8 --steps 300
start=$SECONDS
timeout "${COMPARE_TIMEOUT:-380}" python3 -m esper.cli compare --task cifar10 --max-epochs 40 --max-batches 0 \
  --seeds 5 --workers 10 --gpu-preload --out /tmp/cmp
echo "compare exit $? wall $((SECONDS - start)) s"
cp /tmp/cmp/results.md /tmp/cmp/results.json /tmp/cmp/*.png "${OUT:-/tmp}/" 2>/dev/null
