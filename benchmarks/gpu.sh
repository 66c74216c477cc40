#!/usr/bin/env bash
# Benchmarks 1-3 on one GPU with a realistic teacher and student, sized for one device call:
#   teacher: BEiT-3 large (ViT-L class, 24 layers, 1024 wide), 224 px, random weights in the official
#            checkpoint format (benchmarks/models.py), bf16;
#   student: the `small` preset (ViT-S/16 + a 4-layer 512-wide BERT), 224 px, bf16 autocast.
# Each throughput figure comes as the steady rate (after the actors' or workers' start and the first batches),
# the start-up seconds and the end-to-end rate; every `ratio` is taken between steady rates (see
# benchmarks/common.py). Results go to benchmarks/results/*-gpu.json (or $OUT when set, e.g. on the lent device
# machine); the last command prints them as the README's tables.
#
# On a machine with raydistill installed:   bash benchmarks/gpu.sh
# On an offline GPU machine without Ray (../shared/offline-gpu/README.md), from the repository root:
#   here:   bash ../shared/offline-gpu/make-wheelhouse.sh sentencepiece pyyaml
#   there:  site=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#             --upgrade --target $site .whl/*.whl && export PYTHONPATH=$site:$PWD && bash benchmarks/gpu.sh
# MLflow is not needed: the benchmarks run with tracking off.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
export RAYDISTILL_HOME=${RAYDISTILL_HOME:-$(mktemp -d)}
cpus=$(python3 -c 'import os; print(os.cpu_count())')
common=(--teacher beit3-large --device cuda --out "$out" --tag gpu --num-cpus "$cpus")
echo "== teacher_throughput"
python3 -m benchmarks.teacher_throughput "${common[@]}" --images 12000 --batch-size 512 --gpus-per-actor 1 \
    --cpus-per-actor 4
echo "== train_throughput"
python3 -m benchmarks.train_throughput "${common[@]}" --student small --images 3000 --batch-size 256 \
    --steps 120 --log-every 20 --cpus-per-worker 4
echo "== pipeline"
python3 -m benchmarks.pipeline "${common[@]}" --student small --images 3000 --batch-size 256 --epochs 2 \
    --cpus-per-worker 4 --cpus-per-actor 4
echo "== report"
python3 -m benchmarks.report gpu --results "$out"
