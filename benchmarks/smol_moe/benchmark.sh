#!/usr/bin/env bash
# The smol-moe benchmark of docs/results.md ("Results on smol-moe"), every step in order. Finished
# cells are skipped and interrupted ones resumed, so run it again until it ends; about 15 hours
# of two CPU cores in all. Run from the repository root with flexmoe installed (make install).
set -euo pipefail
OUT=${OUT:-benchmarks/results/smol-moe}
PYTHON=${PYTHON:-.venv/bin/python}
BENCH="$PYTHON -m benchmarks.bench"
# every cell's size: 4 rounds x 2 local steps of 4 examples (32 training examples per client,
# each seen once), 16 test examples per client (8 on the 10-client split), 32 new tokens
S="--model smol-moe --rounds 4 --local-steps 2 --batch-size 4 --max-train 32 --max-test 16
   --max-new-tokens 32 --min-lr 1e-6 --out $OUT --jobs 1"
T="--tuned $OUT/sweep/tuned.json"
PATHOLOGICAL="flex,flex-random,flex-generic,fedavg,fedprox,fedadam,fedavg-full,fedsa-lora,local"

# 0. every cell in OUT runs on one smol-moe build (a build on another machine may differ)
$PYTHON benchmarks/smol_moe/check_model.py --out "$OUT"
# 1. each method's learning rate (FedProx's mu, FedAdam's server rate) on validation data
$BENCH --matrix sweep $S
# 2. the pathological split, 3 seeds; seed 0 also scores every round and MMLU (20 questions
#    per topic)
$BENCH --matrix default --splits pathological --methods $PATHOLOGICAL --seeds 0 \
    --eval-every 1 --mmlu-per-topic 20 $S $T
$BENCH --matrix default --splits pathological --methods $PATHOLOGICAL --seeds 1,2 $S $T
# 3. Dirichlet alpha 1.0 over 10 clients, 2 seeds
$BENCH --matrix default --splits dirichlet-1.0 --methods flex,fedavg,fedavg-full,local \
    --seeds 0,1 $S --max-test 8 $T
# 4. which tokens selection scores (the "all" row is step 2's flex)
$BENCH --matrix ablations --splits selection-tokens-content,selection-tokens-answer \
    --seeds 0,1,2 $S $T
# 4b. grafts whose gates start almost shut (sigmoid of the router row minus 4), beside step 2's
#     flex (bias 0): how much of FLEx's knowledge loss comes from a graft that is half on at once
$BENCH --matrix ablations --splits gate-bias--4.0 --seeds 0,1,2 $S $T
# 5. one report over all of it
$PYTHON -m benchmarks.report "$OUT"
