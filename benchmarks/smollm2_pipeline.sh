#!/usr/bin/env bash
# The SmolLM2-135M-Instruct draft pipeline, from the committed response store to an ablation table.
# Every step resumes where it stopped (answers by chunks, shards one by one, training from its last
# save, measured variants skipped), so after any interruption run the same command again:
#
#     nice -n 10 bash benchmarks/smollm2_pipeline.sh [WORK] > WORK.log 2>&1 &
#
# 1. The target's answers to every usable ShareGPT conversation (up to 4 turns), into the committed
#    store data/smollm2-sharegpt: hours of vLLM on a CPU. Commit the store's new chunks as they come.
# 2. Fused target states (layers 2, 15, 27, and the final state the top-state drafts read) of the held-out
#    conversations and the first eighth of the training ones, computed in bfloat16 where the CPU has bf16
#    instructions (README: same acceptance, 1.66x faster) and in float32 where it has not (bf16 would be
#    ~6x slower there), stored in float16: about 4.6 kB a token, kept in WORK (never committed: they are
#    made again from the store). An eighth, so that on a fresh machine of the slower kinds (an AMD EPYC
#    with AVX512-BF16: 710 target tokens/s in bf16; one with AVX2 alone: 440 in fp32; an Intel Xeon with
#    AMX: 2,000) its states and at least one variant fit in one 3-hour session. No step makes states that
#    WORK holds already.
# 3. First a screen of the query (beagle train --query) on the first thirty-second of the training
#    conversations, the paper's token query against token+state, in fp32, measured as below into
#    benchmarks/results/ablation-query-smollm2-cpu.json; then Beagle variants on that eighth (top or fused
#    states, with or without the state regression), each `beagle train` with the same recipe (in bf16; the
#    fused ones with and without the regression in fp32 too, which shows what bf16 costs and is all that a CPU
#    without bf16 trains, the others waiting for a machine with it), then its
#    offline tau on every held-out sequence and a vLLM run of its own on 16
#    MT-Bench first turns beside plain decoding and n-gram drafting (benchmarks/ablation.py), each
#    variant's row written into benchmarks/results/ablation-eighth-smollm2-cpu.json as it comes: commit it,
#    it is what a fresh machine resumes from. It comes before the rest of the states so that its table
#    (hours earlier) can settle what those are for; the variant most likely to win trains first.
#    Fractions count the store's training conversations (ablation.py --conversations), so the eighth stays
#    an eighth however many states the folder holds by then.
# 4. The data-size curve of step 3's best Beagle variant (highest offline tau, in either precision), point
#    by point: the states of the first quarter of the training conversations, then the same recipe on them,
#    offline and in vLLM (benchmarks/ablation.py again, into benchmarks/results/ablation-size-smollm2-cpu.json);
#    then the half, then all (about 50 GB of states in WORK at the end). Each point's reading comes hours
#    before the whole curve would. Each point is trained in the machine's precision (bf16 where the CPU has
#    it; elsewhere fp32, and the point's name says so: NAME-fp32@F), a point measured on any machine is not
#    trained again, and a curve begun keeps its variant.
# 5. Between the quarter and the half, two more rows of the eighth's file: whether the dataset's own answers
#    help beside the target's (fused states of ShareGPT's own answers to the eighth's conversations, only a
#    prefill each, in WORK/own, and the curve's variant trained on both: NAME+own@0.125), and the EAGLE-1
#    baseline (its full-vocabulary head makes a step ~5x a Beagle one: hours, so after the quarter).
set -euo pipefail
# The whole script is read before it runs (main, called on the last line): editing it while a run is under
# way then changes nothing of that run.
main() {
    cd "$(dirname "$0")/.."
    WORK=${1:-work/smollm2}
    PY=${PY:-.venv/bin/python}
    BEAGLE=(env HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} "$PY" -m vllm_beagle.cli)
    TARGET=$("$PY" -c "from vllm_beagle.smollm2 import smollm2_dir; print(smollm2_dir())")
    # The store's settings (its manifest refuses any other): which conversations, cut where, and which are held
    # out (SELECT, which the dataset's own answers share), and how the target generated.
    SELECT=(--max-prompt-len 1024 --max-new-tokens 256 --turns 4 --heldout 100)
    DATA=(--responses data/smollm2-sharegpt "${SELECT[@]}" --dtype bfloat16 --max-num-seqs 256)
    TRAIN=(--draft-vocab 8192 --window 3 --sim-steps 3 --stage1-epochs 2 --stage2-epochs 1 --batch-size 4
           --max-len 1280 --lr 1e-3 --warmup-steps 50 --save-every 50 --export-dtype float16)

    # bf16 where the CPU has bf16 instructions; elsewhere (AVX2 alone) a bf16 matrix product runs ~100x
    # slower than an fp32 one (vllm_beagle/cpu.py): there the states come in fp32, and the eighth trains only
    # the fused pair with and without the regression, in fp32 (NAME-fp32; the token-only fused one showed
    # bf16 costs nothing); the rest wait for a machine with bf16, which trains that pair in fp32 as well.
    if [ "$("$PY" -c 'from vllm_beagle.cpu import native_bf16; print(native_bf16() is not False)')" = True ]; then
        STATE_DTYPE=bfloat16 PRECISION=bf16 VARIANTS=(fused-noreg top top-noreg fused-noreg-fp32 fused-fp32)
    else
        STATE_DTYPE=float32 PRECISION=fp32 VARIANTS=(fused-noreg-fp32 fused-fp32)
    fi
    echo "smollm2_pipeline.sh: states in $STATE_DTYPE, training in $PRECISION" >&2

    "${BEAGLE[@]}" data "$TARGET" --out "$WORK/answers" "${DATA[@]}" --state none
    FUSED=(--out "$WORK/fused" "${DATA[@]}" --state fused --state-dtype "$STATE_DTYPE" --no-generate)
    TRAINING=15802  # the store's conversations (its manifest: 15,902) but the first 100, held out
    # The states of the held-out conversations and the first $1 training ones, unless the folder holds as many
    # already: beagle data asked for fewer would make its last shard again, cut back.
    states_of() {
        local held
        held=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from ablation import held_conversations
print(held_conversations(sys.argv[1]))' "$WORK/fused/train")
        if [ "$held" -lt "$1" ]; then
            "${BEAGLE[@]}" data "$TARGET" "${FUSED[@]}" --num-prompts $((100 + $1))
        fi
    }
    # The query screen: a thirty-second of the training conversations, the token+state query trained two ways
    # against the paper's token query, each in fp32 (comparable on every machine), before the eighth's rows.
    states_of $((TRAINING / 32))
    "$PY" benchmarks/ablation.py --data "$WORK/fused/train" --work "$WORK/drafts-query" --conversations $TRAINING \
        --variants fused-noreg-qstate-fp32@0.03125 fused-noreg-fp32@0.03125 fused-noreg-qstate-sim-fp32@0.03125 \
        --offline-sequences 1000 --json benchmarks/results/ablation-query-smollm2-cpu.json \
        -- "${TRAIN[@]}" --precision bf16
    # Each variant's row lands in the committed results file as soon as it is measured; ablation.py skips the
    # rows already there, so the ablation carries over to another machine a variant at a time.
    EIGHTH=benchmarks/results/ablation-eighth-smollm2-cpu.json
    PENDING=$("$PY" -c 'import json, sys
print(" ".join(v for v in sys.argv[2:] if v not in json.load(open(sys.argv[1]))["variants"]))' \
        "$EIGHTH" "${VARIANTS[@]/%/@0.125}")
    if [ -n "$PENDING" ]; then
        states_of $((TRAINING / 8))
        "$PY" benchmarks/ablation.py --data "$WORK/fused/train" --work "$WORK/drafts-eighth" \
            --conversations $TRAINING --variants $PENDING --offline-sequences 1000 --json "$EIGHTH" \
            -- "${TRAIN[@]}" --precision bf16
    fi
    SIZE=benchmarks/results/ablation-size-smollm2-cpu.json
    # The curve's three points and step 5's two rows by name: a row measured already keeps its name, whose
    # precision may not be this machine's.
    POINTS=$("$PY" - "$EIGHTH" "$SIZE" "$PRECISION" <<'EOF'
import json, os, sys
eighth, size, precision = sys.argv[1:]
base = lambda v: v.partition("@")[0].removesuffix("-fp32")
rows = json.load(open(eighth))["variants"]
best = base(max((v for v in rows if base(v) != "eagle" and "+own" not in v), key=lambda v: rows[v]["offline"]["tau"]))
done = json.load(open(size)).get("variants", {}) if os.path.isfile(size) else {}
best = next((base(v) for v in done), best)  # a curve begun (perhaps on another kind of machine) goes on with it
for name, suffix, measured in ((best, "@0.25", done), (best, "@0.5", done), (best, "", done),
                               (best, "+own@0.125", rows), ("eagle", "@0.125", rows)):
    names = [v for v in (name + suffix, name + "-fp32" + suffix) if v in measured]
    print(names[0] if names else name + ("-fp32" if precision == "fp32" else "") + suffix)
EOF
    )
    read -r -d '' -a POINTS <<< "$POINTS" || true
    echo "smollm2_pipeline.sh: the data-size curve: ${POINTS[*]:0:3}; then ${POINTS[3]} and ${POINTS[4]}" >&2
    PARTS=(4 2 1)  # each point trains on 1/part of the training conversations
    curve_point() {  # POINTS[$1] after the states it needs, the points before it skipped as measured
        states_of $((TRAINING / PARTS[$1]))
        "$PY" benchmarks/ablation.py --data "$WORK/fused/train" --work "$WORK/drafts-size" --conversations $TRAINING \
            --variants "${POINTS[@]:0:$1+1}" --offline-sequences 1000 --json "$SIZE" -- "${TRAIN[@]}" --precision bf16
    }
    curve_point 0
    # 5. The dataset's own answers beside the target's, and EAGLE-1, at the eighth.
    "${BEAGLE[@]}" data "$TARGET" --out "$WORK/own" "${SELECT[@]}" --answers dataset --state fused \
        --state-dtype "$STATE_DTYPE" --num-prompts $((100 + TRAINING / 8))
    "$PY" benchmarks/ablation.py --data "$WORK/fused/train" --own-answers "$WORK/own/train" --work "$WORK/drafts-eighth" \
        --conversations $TRAINING --variants "${POINTS[@]:3:2}" --offline-sequences 1000 --json "$EIGHTH" \
        -- "${TRAIN[@]}" --precision bf16
    curve_point 1
    curve_point 2
}
main "$@"
