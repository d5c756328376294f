#!/usr/bin/env bash
# The smol-moe benchmark on Dolly-15k with the paper's protocol (docs/results.md), every step in
# order, the most decisive cells first. Finished cells are skipped and an interrupted one resumed,
# so run it again until it ends: about 50 hours of two CPU cores without FedProx (about an hour
# a cell), against the 24 issue 28 allowed even with its cuts taken (sweep grids widened once at
# most, FedProx last so that it can be dropped); commit OUT as cells land. Run from the repository
# root with flexmoe installed (make install). The cells of the Natural Instructions benchmark in
# benchmarks/results/smol-moe were made by this script as of commit 347d2ba.
set -euo pipefail
OUT=${OUT:-benchmarks/results/smol-moe-dolly}
PYTHON=${PYTHON:-.venv/bin/python}
BENCH="$PYTHON -m benchmarks.bench"
# every cell: float32 (bfloat16 mixed precision took 0.69 of a float32 step with eager experts
# where the CPU has bfloat16 kernels, 12x a float32 step where it has not, and the sessions that
# run this matrix land on either kind), 5 local steps of 4 examples, the paper's final learning
# rate, 128 new tokens, one cell at a time
S="--model smol-moe --dtype float32 --local-steps 5 --batch-size 4 --min-lr 1e-6
   --max-new-tokens 128 --out $OUT --jobs 1"
# the pathological split: 4 clients (one paper category each), 10 rounds (200 training examples
# a client, each seen once), 100 test examples a client, the same in every cell
P="--splits pathological --rounds 10 --max-train 200 --max-test 100"
# Dirichlet alpha 1.0 over 10 clients: 5 rounds (100 training examples a client), 40 test
# examples a client
D="--splits dirichlet-1.0 --rounds 5 --max-train 100 --max-test 40"
T="--tuned $OUT/sweep/tuned.json"
# one example a forward pass: 31% of the pathological batches' tokens (37% of Dirichlet's) are
# padding, and a step without it took 0.76 of the time (benchmarks/perf: micro-batches). Each
# method's sweep grid runs at one size: those begun before the setting existed at 0 (whole)
M="--micro-batch-size 1"
FEDERATED="flex,flex-answer,fedavg,fedavg-full,fedsa-lora,local,flex-random"
CONTROLS="flex-at-fedavg-lr,fedavg-at-flex-lr,fedsa-lora-at-flex-lr"

# 0. every cell in OUT on one smol-moe build
$PYTHON benchmarks/smol_moe/check_model.py --out "$OUT"
# 1. each method's learning rate on validation data (50 examples a client), half the rounds,
# grafting from every token as the sweep's first cells did (they predate the token budget); a
# grid widened by one half-decade at most (the cut is the widest values; one is kept, as
# a baseline whose best rate is at the edge of its grid would be an unfair one)
SWEEP="--matrix sweep $S --rounds 5 --max-train 200 --max-test 50 --max-widenings 1"
$BENCH $SWEEP --selection-token-budget 0 --methods flex,fedavg,fedsa-lora
$BENCH $SWEEP --selection-token-budget 0 $M --methods local,fedavg-full
# 2. the pathological split, seed 0, then seeds 1 and 2
$BENCH --matrix default $S $M $P $T --methods $FEDERATED --seeds 0
$BENCH --matrix default $S $M $P $T --methods $FEDERATED --seeds 1,2
# 3. Dirichlet, seeds 0 and 1
$BENCH --matrix default $S $M $D $T --methods $FEDERATED --seeds 0,1
# 4. the equal-rate controls on the pathological split
$BENCH --matrix default $S $M $P $T --methods $CONTROLS --seeds 0,1,2
# 5. FedProx last, the first cut when time is short (it tied FedAvg before)
$BENCH $SWEEP $M --methods fedprox
$BENCH --matrix default $S $M $P $T --methods fedprox --seeds 0,1,2
$BENCH --matrix default $S $M $D $T --methods fedprox --seeds 0,1
# 6. one report over all of it
$PYTHON -m benchmarks.report "$OUT"
