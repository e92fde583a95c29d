#!/usr/bin/env bash
# Device calls (each under the 10-minute limit of one) that check and time what the kernels issue asks on an
# H200; results land in $OUT:
#   bash tools/gpu_check.sh 1    the GPU tests of the kernels and the engine (real 20b/120b shapes, CUDA graphs
#                                against eager), the MoE rows of the kernel bench (1-4096 tokens, % of the copy
#                                bandwidth measured first), and the wgmma kernel's variants from 16 to 4096 tokens
#                                against the default paths (tools/moe_mma_sweep.py)
#   bash tools/gpu_check.sh 2    decode attention's slice counts (powers of two and 3 * 2^k) and tiles at batch 1
#                                and 32, contexts 1k-32k (tools/attention_decode_sweep.py), then the 20b engine: one
#                                stream, then 8 prompts of 1024 tokens, with decode steps profiled at 1, 4 and 8
#   bash tools/gpu_check.sh 3    the decode variants from 1 to 8 tokens against the default paths (tensor-core decode
#                                kernel's staging, two-launch matrix-vector kernels), then part 2's engine run with
#                                the wgmma kernel off (GPTOSS_WGMMA_MOE=0), against part 2's default run
#   bash tools/gpu_check.sh 4    the fused norm + routing kernel's tests and bench rows (against the composed path
#                                it replaces), one MoE layer launch by launch, then part 2's engine run with the
#                                fused kernel off (GPTOSS_FUSED_ROUTER_MAX_TOKENS=0), against part 2's default run
#   bash tools/gpu_check.sh 5    the GPU tests of every kernel and of the engine (the fused routing and attention
#                                front on by default), the wgmma kernel's K blocks a step from 8 to 4096 tokens
#                                against the default paths, and the fused routing kernel's bench rows
#   bash tools/gpu_check.sh 6    the kernel bench's MoE, router and attention-front rows, then the 20b engine with
#                                the defaults and with the fused routing and attention front off
#   bash tools/gpu_check.sh 7    the engine's and the model's GPU tests (triton against torch at the 20b layer
#                                shapes), the fused fronts' and the wgmma kernel's; the wgmma policy's tiles against
#                                the grouped kernel from 16 to 4096 tokens; the bench's MoE, router and attention-front
#                                rows; the 20b engine with the defaults
#   bash tools/gpu_check.sh 8    the final defaults: the model test at the 20b layer shapes (triton against torch),
#                                the engine's, fused fronts' and wgmma GPU tests, the bench's MoE rows, the engine
#   bash tools/gpu_check.sh 9    the wgmma kernel with 8-pair row blocks against the tensor-core decode kernel at 4-8
#                                tokens, then the wgmma kernel's GPU tests (8-pair row blocks and 8 tokens too)
#   bash tools/gpu_check.sh 10   tail blocks: the wgmma kernel's GPU tests (tail blocks too), its 64- and 128-pair
#                                tiles with and without 16-pair tail blocks at 512-4096 tokens, then Nsight Compute
#                                on the 20b layer at 64 tokens (the wgmma decode tiles: stall reasons, issue slots)
#   bash tools/gpu_check.sh 11   occupancy of the wgmma decode tiles: 16- and 8-pair row blocks with fewer ring stages,
#                                64-row programs and register caps (more programs an SM) against the defaults,
#                                8-64 tokens
#   bash tools/gpu_check.sh 12   the wgmma GPU tests with the 64-row small tiles, 64-pair tiles with 64-row programs,
#                                then Nsight Compute's stall reasons: the wgmma decode tile (20b, 64 tokens), the
#                                128-pair tile (120b, 4096 tokens) and the tensor-core decode kernel (20b, 1 token)
#   bash tools/gpu_check.sh 13   the final defaults (a ring a K block of a step): the wgmma, real-shape and model GPU
#                                tests, the engine's, the bench's MoE rows, the 20b engine
#   bash tools/gpu_check.sh 14   decode steps whose pairs go one by one (2-8 tokens): the wgmma kernel's 8- and 16-pair
#                                blocks against the tensor-core decode kernel
#   bash tools/gpu_check.sh 15   the final policy (8-pair wgmma blocks from 8 tokens whatever the experts): the wgmma
#                                and real-shape GPU tests, the bench's MoE rows
#   bash tools/gpu_check.sh 16   the tensor-core decode kernel's tests and variants at 1-4 tokens (run at 2804b83 with
#                                its COPY_WEIGHTS variant, which lost and was reverted)
#   bash tools/gpu_check.sh 17   one MoE layer launch by launch (20b and 120b, 1-4096 tokens: which kernel takes the
#                                time), and 8- against 16-pair wgmma row blocks at 120b 64 tokens (2 pairs an expert)
#   bash tools/gpu_check.sh 18   unmasked scale loads (whole row tiles), products scaled after the wgmma, tail launches
#                                beside the main ones, the grouping a program a chunk: the wgmma GPU tests, the bench's
#                                MoE rows against the tree in .basetree (the session's first commit's parent), the
#                                grouping in one program against a program a chunk, the variants, one MoE layer launch
#                                by launch (the tail launches beside the main ones, TAIL_CONCURRENT, lost and were
#                                removed: the sweep ignores an eighth field now)
#   bash tools/gpu_check.sh 19   the final defaults of 2026-12-06 (later): the wgmma, grouping and real-shape GPU tests,
#                                the grouping in one program against a program a chunk, the bench's MoE rows, the
#                                20b engine
#   bash tools/gpu_check.sh 20   the block tables written by expert, the fused tail blocks (TAIL_FUSED) and the second
#                                matmul's rows stored bf16 unweighted (weighted in the combine): the grouping's, wgmma
#                                and grouped-kernel GPU tests, the grouping both ways, the bench's MoE rows against the
#                                tree in .basetree (b6f2dea), tail blocks fused against their own launches at 1024-4096
#                                tokens, the 120b layer at 4096 tokens by launch (TAIL_FUSED lost and was removed)
#   bash tools/gpu_check.sh 21   prefill tiles: the wgmma GPU tests (256-pair row blocks, 16-byte stores of the second
#                                matmul's rows), row blocks of 256 pairs on one and two warpgroups and 16-byte stores
#                                against the defaults at 2048-4096 tokens, then the 20b engine
#   bash tools/gpu_check.sh 22   the fourth session's final defaults (16-byte stores on): the wgmma, real-shape, serving
#                                and grouping GPU tests, the bench's MoE rows, 16-byte against 2-byte stores on the
#                                decode tiles (8-64 pairs a block), the 20b engine; then the bench's MoE rows and the
#                                engine on the tree in .basetree (b6f2dea, the session's start)
#   bash tools/gpu_check.sh 23   the MoE GPU tests in full (part 22's 150-second step stopped at 60 of them), the
#                                second matmul on 64-row tiles beside the first's 128 (W2, built after part 22) against
#                                the defaults at 2048-4096 tokens (W2 lost and was removed: the sweep ignores a tenth
#                                field now), then the model at the 20b layer shapes and the engine's GPU tests
#   bash tools/gpu_check.sh 24   programmatic dependent launch (triton_utils.PDL): its GPU tests (each chain in a CUDA
#                                graph against serialized launches), the bench's MoE rows at 1-64 tokens and decode
#                                attention rows with it and without (GPTOSS_PDL=0), the 20b engine both ways, the
#                                model at the 20b layer shapes (triton against torch)
#   bash tools/gpu_check.sh 25   the tensor-core decode kernel's second matmul loading its weights before its PDL wait
#                                (EARLY_WEIGHTS): the PDL tests, the bench's MoE rows at 1-8 tokens with it and
#                                without (GPTOSS_MMA_EARLY_WEIGHTS=0); it lost and was removed (the variable is ignored)
#   bash tools/gpu_check.sh 26   decode attention prefetching its first key blocks into L2 before its PDL wait: the PDL
#                                and attention GPU tests, the plan's tiles with 0, 1, 2 and 4 blocks prefetched at batch
#                                1-128 x 1k-32k, the bench's decode rows with PDL and without, one MoE layer by launch
#                                (profiled without PDL), the 20b engine with 2 blocks prefetched and with none; the
#                                prefetch lost and was removed (the sweep's --prefetch is gone, the variable ignored)
#   bash tools/gpu_check.sh 27   part 26's tests and prefetch sweep at batch 1 and 32 again, then the 20b engine four
#                                times each way in alternation: no blocks prefetched against 2, and PDL off against on
#                                (part 26 ran each pair once, in one order)
#   bash tools/gpu_check.sh 28   the read floors beside the targets' rows: the PDL and attention GPU tests (the prefetch
#                                removed), the bench's decode rows with a read floor each, one MoE layer by launch with
#                                its read floor at 1, 8 and 64 tokens (20b and 120b)
#   bash tools/gpu_check.sh 29   more K blocks a wgmma step at decode sizes (5, 6, 9 of 90: fewer instructions a weight,
#                                tools/kernel_sass.py) against the 8- and 16-pair tiles' 3, 8-64 tokens, 20b and 120b;
#                                the wgmma GPU tests at 8-64 tokens with those tiles too
#   bash tools/gpu_check.sh 30   5 K blocks a step on the decode tiles by default: the PDL tests of the MoE chains, the
#                                bench's MoE rows at 1-64 tokens
#   bash tools/gpu_check.sh 35   both matmuls of the wgmma decode tiles in one launch (CHAIN: the second's programs
#                                wait on counters the first's fill) against two launches, 8-64 tokens, 20b and 120b;
#                                then its GPU tests (bitwise the two launches, eager and in CUDA graphs with PDL)
#   bash tools/gpu_check.sh 36   the least of part 35 (about two minutes): 20b at 8 and 64 tokens, the 20b tests
#   bash tools/gpu_check.sh 37   where CHAIN pays (8-pair blocks at 120b 16-64 tokens, 16-pair blocks at 20b 32 and
#                                128 and 120b 128 and 512), then the defaults with it: the model's and the engine's
#                                GPU tests, the bench's MoE rows at 8 and 64 tokens, the 20b engine with and without
#                                it (GPTOSS_WGMMA_CHAIN=0)
#   bash tools/gpu_check.sh 40   the chained launch called 3000 times in a row (eager, then graph replays) at the
#                                decode tiles, 8-64 tokens (tools/chain_stress.py: a hang stops a step at its time
#                                limit), PDL on and off
#   bash tools/gpu_check.sh 41   the chained launch's GPU tests and part 40's stress on the defaults, then the bench's
#                                20b MoE rows at 8 and 64 tokens four times over (their spread between runs)
#   bash tools/gpu_check.sh 42   the split layout's new byte (pack_split_bytes): every MoE, PDL, model and engine GPU
#                                test, then the bench's MoE rows against OLD_TREE (a checkout of the old bytes) in
#                                turn, then the 20b engine
#   bash tools/gpu_check.sh 43   the 1-token MoE rows, new bytes against OLD_TREE (a checkout of 108a724: `git
#                                archive 108a724 kernels gptoss_serve tools | tar -x -C .old_split`, carried), six
#                                rounds each going first as often; then every kernel, PDL and engine GPU test
#   bash tools/gpu_check.sh 44   decode attention on token-major KV blocks against head-major ones (a KV head's rows
#                                of a block contiguous: the engine's since part 45), block sizes 16 and 32, in turn;
#                                then the 1-token MoE rows, this tree against OLD_TREE, two rounds each first once
#   bash tools/gpu_check.sh 46   decode attention on head-major KV blocks (the engine's since part 45) with the
#                                slices merged by the last slice at 2 slices (FUSED_MERGE_MAX_SPLITS): the attention,
#                                PDL, model and engine GPU tests, then the bench's decode rows with their read floors
#   bash tools/gpu_check.sh 47   the 20b engine, then slice counts and block sizes at batch 32 x 1k
#   bash tools/gpu_check.sh 48   slice counts on head-major blocks where decode_plan's rules were set on token-major
#                                ones: batch 16-128 at 1k and 2k keys (1, 2 and 4 slices, merged by the last slice),
#                                batch 1 at 8k and 32k keys (16 to 128 slices, the merge kernel); decode_plan keeps
#                                contexts of <= 1024 keys whole from ~2 programs a SM since 972ef30, timed at 32 x 1k
#                                only: this times 64 and 128 x 1k at one slice against two
#   bash tools/gpu_check.sh 49   the 20b engine on head-major KV blocks against a copy of this tree with token-major
#                                ones (KVCache.allocate patched in the copy), ROUNDS rounds (2), each first in turn:
#                                part 47's single-stream TTFT was twice the eleventh session's
#   bash tools/gpu_check.sh 50   (ran at 47ae117; head groups lost and are gone, so the sweep now reads ":::2" as the
#                                plan's tiles) head groups (several programs a KV head, each with some of its
#                                queries): the attention tests on the GPU, then head groups 1-8 against the plan at
#                                batch 1 (1k-32k keys), 32 x 1k and 128 x 1k; the one-slice rule (<= 2048 keys, one
#                                wave of 2-4 programs a SM) at 32 and 64 x 2k with 64- and 128-key blocks; then part
#                                49 with ROUNDS=1
#   bash tools/gpu_check.sh 51   the single stream's TTFT on head- against token-major caches: the bench's prefill
#                                attention and attention-front rows at 1024 tokens on each layout in turn (two rounds),
#                                then part 49 with ROUNDS=2 (each single stream now the median of 3 prompts); then the
#                                bench's decode rows with decode_plan's final one-slice rule
#   bash tools/gpu_check.sh 52   where the head-major caches' prefill time goes: the 20b engine's prompts of 1024 tokens
#                                alone to their first token (5 a run) and one under the profiler (GPU time by kernel),
#                                head- and token-major trees in turn, ROUNDS rounds (2)
#   bash tools/gpu_check.sh 53   the decode rows still short: 32 x 1k's one slice with three stages, 64-key blocks
#                                (two to four stages) and two warps; 1 x 32k at 32-128 slices with 64- and 128-key
#                                blocks and deeper pipelines; batch 1 x 1k / 8k with the last slice's merge at 4-64
#                                slices (one launch, untimed with the one-tile sums); the bench's attention-front rows
#   bash tools/gpu_check.sh 54   (ran at 41c07c5; the carried pages lost in decode and are gone from it) K and V
#                                loaded ahead (pages carried a block, so num_stages = s gives s - 1 buffers): the decode
#                                attention GPU tests, then 2-4 stages and 64/128-key blocks at the bench's nine decode
#                                shapes, against the plan's tiles in OLD_TREE (git archive 939d3ed kernels gptoss_serve
#                                tools: one buffer at any stage count)
#   bash tools/gpu_check.sh 55   (ran at 8358256; CARRY_PAGES lost and is gone, and the sweep's fifth field with it)
#                                prefill attention with its pages carried a block ahead (CARRY_PAGES: K and V buffered
#                                num_stages - 1 deep) against the pages loaded where used, at 2-4 stages, 4 and 8 warps,
#                                64-256 rows and 64/128-key blocks, 1k and 8k tokens, beside SDPA
#                                (tools/attention_prefill_sweep.py); then the attention tests on the GPU
#   bash tools/gpu_check.sh 56   (ran at 41e9bf6; ALIGN lost and is gone) decode attention with the lengths and first
#                                pages loaded before the PDL wait (EARLY_META) and with slices of any length (ALIGN 1,
#                                66 or 132 slices: 4 or 8 programs on every SM at batch 1): the decode and PDL tests on
#                                the GPU, each launch's time in a layer (attention_decode_sweep.py --profile), batch 1,
#                                32 and 128 at 1k and 8k and 1 x 32k both ways
#   bash tools/gpu_check.sh 57   (ran at 7698107; the slice-by-slice merge lost and is gone: --fused-merge 1 now times
#                                the [heads, slices, 64] one) the last slice's merge at many slices (_merge_online,
#                                slice by slice) against the merge kernel at batch 1, each with decode layers timed 4
#                                and 24 to a graph (24: a 20b decode step's attention launches); the merge and PDL
#                                decode tests on the GPU; EARLY_META at decode_plan's one-wave shapes (batch 32 and 64
#                                at 1k and 2k); the bench's decode rows at 24 layers a graph; prefill attention with
#                                64-row tiles (168 registers, 3 programs a SM, against the default's 254 and 2) and
#                                32-key blocks
#   bash tools/gpu_check.sh 58   the MoE rows and their read floors at 24 layers a graph against 4 (the decode rows'
#                                method since the sixteenth session; is 80% at 1 token out of reach?): the bench's MoE
#                                rows at 1, 8 and 64 tokens, then one 20b and one 120b layer by launch at 1 token with
#                                its read floor, each with --moe-layers 24 and 4; the prefill tests and the
#                                window layers' 32-key blocks (the default since 5bd0e2c) against 64
#   bash tools/gpu_check.sh 59   the tensor-core decode kernel's weights copied asynchronously into shared memory
#                                (ASYNC_GROUPS 1, 2; 2 with 30 K blocks a program; the second matmul's copies
#                                before its PDL wait, EARLY_WEIGHTS): its GPU tests, the sweep at 1 token (24
#                                launches a graph), the bench's MoE rows at 1-4 tokens with it in 2 groups with
#                                EARLY_WEIGHTS
#   bash tools/gpu_check.sh 60   the one-launch decode MoE kernel (kernels/moe_mma_fused.py): its GPU tests (twin,
#                                four-launch chain, CUDA graph), then the sweep at 1 token (24 launches a graph):
#                                its Q:SLOTS:WARPS[:TMA] variants (FUSED_SPECS) against the default and the chain's
#                                asynchronous copies in 2 groups with EARLY_WEIGHTS; Nsight Compute's stall reasons
#                                of its default config at one token
#   (parts 38 and 39, the chained launch's other ways to wait, ran at commits 9002237 and 90b141c; part 45, SwiGLU and
#   the combine in the tensor-core decode kernel's last programs, at 8545a9d; those ways are gone, docs/PERFORMANCE.md
#   has their figures)
# Each step has its own time limit, so a slow one costs only itself.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/gpu_check}"
PART="${1:-1}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/device.txt"
git log -1 --format=%H 2>/dev/null | tee -a "$OUT/device.txt"
moe_gpu_tests() {  # $1 the -k filter of tests/test_kernels_moe.py's GPU tests, $2 the time limit (s)
    timeout "$2" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py -k "$1" -rfE \
        > "$OUT/tests_full.txt" 2>&1
    tail -12 "$OUT/tests_full.txt"
}
stalls() {  # $1 name, $2 kernel regex, $3 launches to skip, $4.. ncu_moe_layer.py arguments: Nsight Compute
    local name=$1 regex=$2 skip=$3 ncu; shift 3
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    timeout 100 "$ncu" --clock-control none --section SpeedOfLight --section Occupancy --section SchedulerStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" -k "regex:$regex" \
        --launch-skip "$skip" --launch-count 1 python3 tools/ncu_moe_layer.py "$@" > "$OUT/ncu_$name.txt" 2>&1
    echo "== $name"; grep -E "Duration|DRAM Throughput|Issued Warp|Active Warps Per Sch|Eligible Warps" \
        "$OUT/ncu_$name.txt"
    grep -E "issue_stalled" "$OUT/ncu_$name.txt" | awk '{print $NF, $1}' | sort -rn | head -8
}
moe_rows() {  # the bench's MoE rows (1-4096 tokens, 20b and 120b)
    timeout 75 python3 -m gptoss_serve.kernels.bench --sections moe --json "$OUT/bench.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench.txt"
}
grouping_rows() {  # group_by_expert in one program against a program a chunk
    timeout 45 python3 -m gptoss_serve.kernels.bench --sections grouping 2>&1 | grep -v Warning \
        | tee "$OUT/grouping.txt"
}
engine_run() {  # $1 time limit (s), then extra arguments: the 20b engine, one stream, then 8 prompts of 1024 tokens
    local limit=$1; shift
    timeout "$limit" python3 -m gptoss_serve.cluster.engine.cli bench offline --preset gpt-oss-20b --random-weights \
        --kernels triton --num-prompts 8 --input-len 1024 --output-len 256 --single-stream --json "$@" 2>&1
}
engine_alternating() {  # $1 an environment variable, $2 $3 its two values: engine_run's rows, four rounds in turn
    for round in 1 2 3 4; do
        for value in "$2" "$3"; do
            echo "round $round, $1=$value"
            (export "$1=$value"; engine_run 60) | grep -E "^ours"
        done
    done
}
engine_bench() {  # $1 output file: engine_run with decode profiled at 1, 4 and 8
    engine_run 240 --profile-decode 1 4 8 | tail -60 | tee "$1"
}
make_token_tree() {  # $1 a folder: a copy of this tree whose KVCache.allocate stores blocks token-major
    rm -rf "$1"; mkdir -p "$1"; cp -r gptoss_serve kernels model cluster "$1"/
    python3 - "$1/model/batch.py" <<'PATCH'
import sys
path = sys.argv[1]
text = open(path).read()
head_major = ("num_kv_heads or config.num_key_value_heads,\n                      block_size, config.head_dim)\n"
              "            return torch.zeros(stored, dtype=dtype, device=device).transpose(1, 2)")
assert head_major in text, "KVCache.allocate changed: update make_token_tree"
open(path, "w").write(text.replace(head_major, "block_size,\n                      num_kv_heads or "
                                   "config.num_key_value_heads, config.head_dim)\n"
                                   "            return torch.zeros(stored, dtype=dtype, device=device)"))
PATCH
}
head_and_token_rounds() {  # $1 a command taking (label, tree), $2 rounds: run on this tree (head-major caches) and
    # on make_token_tree's copy in turn, each first in turn
    make_token_tree /tmp/token_major_tree
    for round in $(seq "$2"); do
        if [ "$round" = 1 ]; then "$1" head .; "$1" token /tmp/token_major_tree
        else "$1" token /tmp/token_major_tree; "$1" head .; fi
    done
}
decode_sweep() {  # $1 time limit (s), $2 file in $OUT (appended), then tools/attention_decode_sweep.py's arguments
    timeout "$1" python3 tools/attention_decode_sweep.py "${@:3}" 2>&1 | grep -v Warning | tee -a "$OUT/$2"
}
decode_variants() {  # $1 time limit (s), $2 file in $OUT, $3 batches, $4 contexts, $5 merges (0 kernel, 1 last
    # slice), $6 slice counts (0: the plan's), $7 tiles (plan or N:W:S): decode_sweep on head-major blocks, two rounds
    decode_sweep "$1" "$2" --layouts head --fused-merge "$5" --splits "$6" --tiles "$7" --rounds 2 --batches "$3" \
        --contexts "$4"
}
decode_rows() {  # $1 time limit (s): the bench's decode rows with their read floors
    timeout "$1" python3 -m gptoss_serve.kernels.bench --sections decode --json "$OUT/bench_decode.json" 2>&1 \
        | grep -v Warning | grep -E "^decode attn|^\| decode|^HBM" | tee "$OUT/bench_decode.txt"
}
engine_table() {  # $1 output file, $2 time limit: engine_run's summary table only
    engine_run "$2" | grep -E "^ours|^run " > "$1"; cat "$1"
}
moe_rows_at() {  # $1 time limit (s), $2 token counts: the bench's MoE rows at those counts only
    timeout "$1" python3 -m gptoss_serve.kernels.bench --sections moe --tokens "$2" --json "$OUT/bench_moe.json" 2>&1 \
        | grep -v Warning | grep "^| MoE" | tee "$OUT/bench_moe.txt"
}
tree_rows() {  # $1 label, $2 checkout, $3 experts, $4 tokens: the bench's MoE rows from that checkout (A/B runs)
    (cd "$2" && PYTHONPATH="$PWD" timeout 60 python3 -m gptoss_serve.kernels.bench --sections moe --tokens "$4" \
        --experts "$3" 2>&1) | grep -E "^\| MoE|^HBM copy" | sort -u | sed "s/^/$1 /" | tee -a "$OUT/bench_ab.txt"
}
one_token_ab() {  # $1 rounds: the 1-token MoE rows, this tree and OLD_TREE in turn, each going first as often
    for round in $(seq "$1"); do
        tree_rows new . 32,128 1; tree_rows old "$OLD_TREE" 32,128 1
        tree_rows old "$OLD_TREE" 32,128 1; tree_rows new . 32,128 1
    done
}
pdl_moe_tests() {  # $1 time limit (s): the PDL tests of the MoE chains
    timeout "$1" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_pdl.py -k moe -rfE 2>&1 \
        | tail -4
}
model_engine_tests() {  # $1 lines shown: the model at the 20b layer shapes (triton against torch), the engine's
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_model.py \
        tests/engine/test_engine_gpu.py -rfE > "$OUT/tests_model_engine.txt" 2>&1
    tail -"$1" "$OUT/tests_model_engine.txt"
}
wgmma_sweep() {  # $1 time limit (s), $2 cases, $3 wgmma tiles, $4 output file (appended): the wgmma tiles only
    timeout "$1" python3 tools/moe_mma_sweep.py --cases "$2" --no-gemv --no-mma --wgmma "$3" 2>&1 \
        | grep -v Warning | tee -a "$OUT/$4"
}
chain_check() {  # $1 sweep limit (s), $2 cases, $3 test limit (s), $4 -k filter: the chained launch against two
    wgmma_sweep "$1" "$2" 8:1:20:5:0:0:1,8:1:20:5:0:0:1/chain,16:1:10:5,16:1:10:5/chain chain_sweep.txt
    timeout "$3" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        tests/test_kernels_pdl.py -k "$4" -rfE 2>&1 | tail -8 | tee "$OUT/chain_tests.txt"
}
if [ "$PART" = 1 ]; then
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_moe.py \
        tests/test_kernels_attention.py tests/test_kernels_model.py tests/test_kernels_norm_rope.py \
        tests/test_kernels_router.py tests/engine/test_engine_gpu.py -rfE > "$OUT/tests_full.txt" 2>&1
    tail -30 "$OUT/tests_full.txt"
    timeout 90 python3 -m gptoss_serve.kernels.bench --sections moe --json "$OUT/bench_moe.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench_moe.txt"
    timeout 230 python3 tools/moe_mma_sweep.py --cases 32x16,32x64,128x64,32x512,32x4096,128x4096 2>&1 \
        | grep -v Warning | tee "$OUT/wgmma_sweep.txt"
elif [ "$PART" = 2 ]; then
    timeout 300 python3 tools/attention_decode_sweep.py --batches 1,32 --contexts 1024,8192,32768 \
        --json "$OUT/attention_sweep.json" 2>&1 | grep -v Warning | tee "$OUT/attention_sweep.txt"
    engine_bench "$OUT/engine.txt"
elif [ "$PART" = 3 ]; then
    timeout 200 python3 tools/moe_mma_sweep.py --cases 32x1,128x1,32x2,32x4,32x8,128x8 2>&1 | grep -v Warning \
        | tee "$OUT/decode_sweep.txt"
    (export GPTOSS_WGMMA_MOE=0; engine_bench "$OUT/engine_no_wgmma.txt")
elif [ "$PART" = 5 ]; then
    timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider $(ls tests/test_kernels_*.py) \
        tests/engine/test_engine_gpu.py -rfE > "$OUT/tests_full.txt" 2>&1; tail -30 "$OUT/tests_full.txt"
    timeout 220 python3 tools/moe_mma_sweep.py --cases 32x64,128x4096,32x16,128x64,32x8 2>&1 \
        | grep -v Warning | tee "$OUT/wgmma_sweep.txt"
    timeout 50 python3 -m gptoss_serve.kernels.bench --sections router --json "$OUT/bench_router.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench_router.txt"
elif [ "$PART" = 6 ]; then
    timeout 150 python3 -m gptoss_serve.kernels.bench --sections moe,router,attention-front \
        --json "$OUT/bench.json" 2>&1 | grep -v Warning | tee "$OUT/bench.txt"
    engine_bench "$OUT/engine.txt"
    (export GPTOSS_FUSED_ROUTER_MAX_TOKENS=0 GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS=0
     engine_bench "$OUT/engine_unfused.txt")
elif [ "$PART" = 7 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/engine/test_engine_gpu.py \
        tests/test_kernels_model.py tests/test_kernels_attention_front.py tests/test_kernels_router.py \
        tests/test_kernels_moe.py -k "engine or model or front or route or wgmma or real_shapes or serving" -rfE \
        > "$OUT/tests_full.txt" 2>&1; tail -30 "$OUT/tests_full.txt"
    timeout 130 python3 tools/moe_mma_sweep.py --cases 32x128,128x512,128x16,32x1024,32x4096 \
        --wgmma 16:2:12:3,16:2:18:6,64:2:9:3,128:2:9:3 2>&1 | grep -v Warning | tee "$OUT/wgmma_sweep.txt"
    timeout 100 python3 -m gptoss_serve.kernels.bench --sections moe,attention-front \
        --json "$OUT/bench.json" 2>&1 | grep -v Warning | tee "$OUT/bench.txt"
    engine_bench "$OUT/engine.txt"
elif [ "$PART" = 8 ]; then
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_model.py \
        > "$OUT/tests_model.txt" 2>&1; tail -25 "$OUT/tests_model.txt"
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/engine/test_engine_gpu.py \
        tests/test_kernels_attention_front.py tests/test_kernels_router.py tests/test_kernels_moe.py \
        -k "engine or front or route or wgmma or real_shapes" -rfE > "$OUT/tests_full.txt" 2>&1
    tail -25 "$OUT/tests_full.txt"
    timeout 100 python3 -m gptoss_serve.kernels.bench --sections moe --json "$OUT/bench.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench.txt"
    engine_bench "$OUT/engine.txt"
elif [ "$PART" = 9 ]; then
    timeout 100 python3 tools/moe_mma_sweep.py --cases 32x8,128x8,32x4 --wgmma 8:2:12:3,16:2:12:3 2>&1 \
        | grep -v Warning | tee "$OUT/wgmma_sweep.txt"
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py -k wgmma \
        -rfE > "$OUT/tests_full.txt" 2>&1; tail -25 "$OUT/tests_full.txt"
elif [ "$PART" = 10 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        -k "wgmma or real_shapes" -rfE > "$OUT/tests_full.txt" 2>&1; tail -25 "$OUT/tests_full.txt"
    timeout 200 python3 tools/moe_mma_sweep.py --cases 32x512,128x4096,32x1024,32x4096,128x2048 \
        --wgmma 128:2:9:3,128:2:9:3:16,128:2:9:3:32,128:2:9:3:48,128:2:9:3:64,64:2:9:3,64:2:9:3:16 2>&1 \
        | grep -v Warning | tee "$OUT/tail_sweep.txt"
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    timeout 120 "$NCU" --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section LaunchStats -k "regex:_moe_wgmma" --launch-skip 4 --launch-count 2 \
        python3 tools/ncu_moe_layer.py 64 > "$OUT/ncu_wgmma_64.txt" 2>&1
    grep -E "Duration|Throughput|Stall|Warp Cycles|Issued|Eligible|Active Warps|Registers|Shared Memory|Theoretical" \
        "$OUT/ncu_wgmma_64.txt" | head -80
elif [ "$PART" = 11 ]; then
    timeout 250 python3 tools/moe_mma_sweep.py --cases 32x64,128x64,32x16,32x32 \
        --wgmma 16:2:12:3,16:2:8:3:0:64,16:2:6:3:0:64,16:1:8:3,16:1:8:3:0:48,16:1:6:3:0:48,16:1:12:3 2>&1 \
        | grep -v Warning | tee "$OUT/occupancy_sweep.txt"
    timeout 150 python3 tools/moe_mma_sweep.py --cases 32x8,32x6 --wgmma 8:2:12:3,8:2:8:3:0:64,8:1:8:3,8:1:8:3:0:48 \
        2>&1 | grep -v Warning | tee "$OUT/occupancy_sweep_8.txt"
elif [ "$PART" = 12 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        -k "wgmma or real_shapes" -rfE > "$OUT/tests_full.txt" 2>&1; tail -25 "$OUT/tests_full.txt"
    timeout 120 python3 tools/moe_mma_sweep.py --cases 32x256,32x512,128x1024 \
        --wgmma 64:2:9:3,64:1:8:3,64:1:9:3,64:1:12:3 2>&1 | grep -v Warning | tee "$OUT/t64_sweep.txt"
    stalls decode64 _moe_wgmma 2 64
    stalls prefill120b _moe_wgmma 4 4096 128
    stalls mma1 _moe_mma 2 1
elif [ "$PART" = 13 ]; then
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        -k "wgmma or real_shapes or serving" -rfE > "$OUT/tests_full.txt" 2>&1; tail -15 "$OUT/tests_full.txt"
    model_engine_tests 15
    timeout 100 python3 -m gptoss_serve.kernels.bench --sections moe --json "$OUT/bench.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench.txt"
    engine_bench "$OUT/engine.txt"
elif [ "$PART" = 14 ]; then
    timeout 200 python3 tools/moe_mma_sweep.py --cases 128x8,128x4,32x4,128x2,32x2 --wgmma 8:1:12:3,8:1:6:3,16:1:6:3 \
        2>&1 | grep -v Warning | tee "$OUT/apart_sweep.txt"
elif [ "$PART" = 15 ]; then
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        -k "wgmma or real_shapes" -rfE > "$OUT/tests_full.txt" 2>&1; tail -15 "$OUT/tests_full.txt"
    timeout 100 python3 -m gptoss_serve.kernels.bench --sections moe --json "$OUT/bench.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench.txt"
elif [ "$PART" = 16 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        -k "mma_checkpoint or mma_matches" -x -rfE > "$OUT/tests_mma.txt" 2>&1; tail -8 "$OUT/tests_mma.txt"
    timeout 90 python3 tools/moe_mma_sweep.py --cases 32x1,128x1,32x4 --no-gemv 2>&1 | grep -v Warning \
        | tee "$OUT/copy_sweep.txt"
elif [ "$PART" = 17 ]; then
    timeout 240 python3 -m gptoss_serve.kernels.bench --sections moe-launches --tokens 1,8,64,4096 \
        --experts 32,128 --json "$OUT/launches.json" 2>&1 | grep -v Warning | tee "$OUT/launches.txt"
    timeout 150 python3 tools/moe_mma_sweep.py --cases 128x64,128x32,32x64 --no-gemv \
        --wgmma 16:1:6:3,16:1:9:3,8:1:6:3,8:1:9:3,8:1:12:3 2>&1 | grep -v Warning | tee "$OUT/blocks8_sweep.txt"
elif [ "$PART" = 18 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        -k "wgmma or real_shapes" -rfE > "$OUT/tests_full.txt" 2>&1; tail -15 "$OUT/tests_full.txt"
    moe_rows
    [ -d .basetree ] && (cd .basetree && PYTHONPATH="$PWD" timeout 75 python3 -m gptoss_serve.kernels.bench \
        --sections moe --json "$OUT/bench_base.json" 2>&1 | grep -v Warning | tee "$OUT/bench_base.txt")
    grouping_rows
    timeout 85 python3 tools/moe_mma_sweep.py --cases 32x8,32x64,128x64 --no-gemv \
        --wgmma 8:1:12:3,8:1:12:3:0:0:1,16:1:6:3,16:1:6:3:0:0:1,8:1:6:3:0:0:1 2>&1 | grep -v Warning \
        | tee "$OUT/scale_after_sweep.txt"
    timeout 90 python3 tools/moe_mma_sweep.py --cases 128x4096,32x1024 --no-gemv \
        --wgmma 128:2:9:3:16,128:2:9:3:16:0:0:1 2>&1 | grep -v Warning | tee "$OUT/tail_beside_sweep.txt"
    timeout 75 python3 -m gptoss_serve.kernels.bench --sections moe-launches --tokens 1,64,4096 \
        --experts 32,128 --json "$OUT/launches.json" 2>&1 | grep -v Warning | tee "$OUT/launches.txt"
elif [ "$PART" = 19 ]; then
    moe_gpu_tests "wgmma or real_shapes or serving or group" 130
    grouping_rows
    moe_rows
    engine_run 150 | tail -40 > "$OUT/engine.txt"
    tail -30 "$OUT/engine.txt"
elif [ "$PART" = 20 ]; then
    moe_gpu_tests "wgmma or real_shapes or serving or group" 150
    grouping_rows
    moe_rows
    [ -d .basetree ] && (cd .basetree && PYTHONPATH="$PWD" timeout 75 python3 -m gptoss_serve.kernels.bench \
        --sections moe --json "$OUT/bench_base.json" 2>&1 | grep -v Warning | tee "$OUT/bench_base.txt")
    timeout 100 python3 tools/moe_mma_sweep.py --cases 128x4096,32x1024,128x2048 --no-gemv \
        --wgmma 128:2:9:3:16,128:2:9:3:16:0:0:1 2>&1 | grep -v Warning | tee "$OUT/tail_fused_sweep.txt"
    timeout 50 python3 -m gptoss_serve.kernels.bench --sections moe-launches --tokens 4096 --experts 128 2>&1 \
        | grep -v Warning | tee "$OUT/launches.txt"
elif [ "$PART" = 21 ]; then
    moe_gpu_tests "wgmma_matches or group" 170
    timeout 230 python3 tools/moe_mma_sweep.py --cases 128x4096,32x4096,32x2048 --no-gemv \
        --wgmma 128:2:9:3:16,128:2:9:3:16:0:0:4:1,256:1:6:3:0:0:0:4:1,256:1:6:3:0:0:0:8:1,256:1:6:3:32:0:0:8:1 2>&1 \
        | grep -v Warning | tee "$OUT/prefill_tile_sweep.txt"
    engine_run 150 | tail -40 > "$OUT/engine.txt"
    tail -25 "$OUT/engine.txt"
    tail -4 "$OUT/tests_full.txt"
elif [ "$PART" = 22 ]; then
    moe_gpu_tests "wgmma or real_shapes or serving or group" 150
    moe_rows
    timeout 100 python3 tools/moe_mma_sweep.py --cases 32x8,32x64,128x64,32x512 --no-gemv \
        --wgmma 8:1:12:3:0:0:1:4:0,8:1:12:3:0:0:1:4:1,16:1:6:3:0:0:0:4:0,16:1:6:3:0:0:0:4:1,\
64:2:6:3:0:0:0:4:0,64:2:6:3:0:0:0:4:1 \
        2>&1 | grep -v Warning | tee "$OUT/store_sweep.txt"
    engine_table "$OUT/engine.txt" 110
    [ -d .basetree ] && (cd .basetree && export PYTHONPATH="$PWD" && timeout 75 python3 -m gptoss_serve.kernels.bench \
        --sections moe 2>&1 | grep -v Warning > "$OUT/bench_base.txt"; tail -12 "$OUT/bench_base.txt"
        engine_table "$OUT/engine_base.txt" 110)
    tail -4 "$OUT/tests_full.txt"
elif [ "$PART" = 23 ]; then
    moe_gpu_tests "" 300
    timeout 90 python3 tools/moe_mma_sweep.py --cases 128x4096,32x4096,32x2048 --no-gemv \
        --wgmma 128:2:9:3:16,128:2:9:3:16:0:0:4:1:1 2>&1 | grep -v Warning | tee "$OUT/w2_tile_sweep.txt"
    model_engine_tests 8
elif [ "$PART" = 24 ]; then
    timeout 140 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_pdl.py -rfE \
        > "$OUT/tests_pdl.txt" 2>&1; tail -12 "$OUT/tests_pdl.txt"
    for pdl in 1 0; do
        GPTOSS_PDL=$pdl timeout 85 python3 -m gptoss_serve.kernels.bench --sections moe,decode --tokens 1,8,64 \
            --json "$OUT/bench_pdl$pdl.json" 2>&1 | grep -v Warning | tail -17 | tee "$OUT/bench_pdl$pdl.txt"
    done
    for pdl in 1 0; do
        (export GPTOSS_PDL=$pdl; engine_table "$OUT/engine_pdl$pdl.txt" 95)
    done
    timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_model.py -rfE \
        > "$OUT/tests_model.txt" 2>&1; tail -6 "$OUT/tests_model.txt"
elif [ "$PART" = 25 ]; then
    timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_pdl.py -rfE \
        > "$OUT/tests_pdl.txt" 2>&1; tail -8 "$OUT/tests_pdl.txt"
    for early in 1 0; do
        GPTOSS_MMA_EARLY_WEIGHTS=$early timeout 60 python3 -m gptoss_serve.kernels.bench --sections moe \
            --tokens 1,2,4,8 --json "$OUT/bench_early$early.json" 2>&1 | grep -v Warning | tail -10 \
            | tee "$OUT/bench_early$early.txt"
    done
elif [ "$PART" = 26 ]; then
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_pdl.py \
        tests/test_kernels_attention.py -rfE > "$OUT/tests_pdl_attention.txt" 2>&1
    tail -8 "$OUT/tests_pdl_attention.txt"
    timeout 170 python3 tools/attention_decode_sweep.py --prefetch 0,1,2,4 --json "$OUT/prefetch_sweep.json" 2>&1 \
        | grep -v Warning | tee "$OUT/prefetch_sweep.txt"
    for pdl in 1 0; do
        GPTOSS_PDL=$pdl timeout 60 python3 -m gptoss_serve.kernels.bench --sections decode \
            --json "$OUT/bench_decode_pdl$pdl.json" 2>&1 | grep -v Warning | tail -11 \
            | tee "$OUT/bench_decode_pdl$pdl.txt"
    done
    timeout 50 python3 -m gptoss_serve.kernels.bench --sections moe-launches --tokens 1,8 --experts 32 2>&1 \
        | grep -v Warning | tee "$OUT/moe_launches.txt"
    for blocks in 2 0; do
        (export GPTOSS_ATTN_PREFETCH_BLOCKS=$blocks; engine_table "$OUT/engine_prefetch$blocks.txt" 80)
    done
elif [ "$PART" = 27 ]; then
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_pdl.py \
        tests/test_kernels_attention.py -rfE 2>&1 | tail -6
    timeout 90 python3 tools/attention_decode_sweep.py --batches 1,32 --prefetch 0,1,2 2>&1 | grep -v Warning \
        | sed -e 's/ *splits None//' -e 's/PREFETCH_BLOCKS/p/'
    engine_alternating GPTOSS_ATTN_PREFETCH_BLOCKS 0 2
    engine_alternating GPTOSS_PDL 0 1
elif [ "$PART" = 28 ]; then
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_pdl.py \
        tests/test_kernels_attention.py -rfE 2>&1 | tail -6
    timeout 120 python3 -m gptoss_serve.kernels.bench --sections decode --json "$OUT/bench_decode.json" 2>&1 \
        | grep -v Warning | grep -E "^decode attn|^\| decode" | tee "$OUT/bench_decode.txt"
    timeout 200 python3 -m gptoss_serve.kernels.bench --sections moe-launches --tokens 1,8,64 --experts 32,128 \
        --json "$OUT/moe_launches.json" 2>&1 | grep -v Warning | grep -E "^MoE|^launches" | tee "$OUT/moe_launches.txt"
elif [ "$PART" = 29 ]; then
    timeout 200 python3 tools/moe_mma_sweep.py --cases 32x8,128x8,32x64,128x64 --no-gemv --no-mma \
        --wgmma 8:1:12:3:0:0:1,8:1:20:5:0:0:1,8:1:18:6:0:0:1,8:1:27:9:0:0:1,16:1:6:3,16:1:10:5,16:1:12:6 \
        2>&1 | grep -v Warning | tee "$OUT/kb_sweep.txt"
    moe_gpu_tests "wgmma_matches and not 4096 and not 512" 130
elif [ "$PART" = 30 ]; then
    pdl_moe_tests 70
    moe_rows_at 80 1,8,64
elif [ "$PART" = 35 ]; then
    chain_check 200 32x8,128x8,32x16,32x64,128x64 150 chain
elif [ "$PART" = 36 ]; then
    chain_check 100 32x8,32x64 50 "chain and not 512 and not 120b"
elif [ "$PART" = 37 ]; then
    wgmma_sweep 100 128x16,128x32,128x48,128x64,32x8 8:1:20:5:0:0:1,8:1:20:5:0:0:1/chain chain_reach.txt
    wgmma_sweep 100 32x32,32x128,128x128,128x512 16:1:10:5,16:1:10:5/chain chain_reach.txt
    model_engine_tests 6
    moe_rows_at 60 8,64
    engine_table "$OUT/engine.txt" 110
    (export GPTOSS_WGMMA_CHAIN=0; engine_table "$OUT/engine_two_launches.txt" 110)
elif [ "$PART" = 40 ]; then
    stress() {  # $1 time limit (s), $2 cases: tools/chain_stress.py, 3000 calls a case
        timeout "$1" python3 tools/chain_stress.py --calls 3000 --cases "$2" 2>&1 | grep -v Warning \
            | tee -a "$OUT/chain_stress.txt"; echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/chain_stress.txt"
    }
    stress 150 32x8:8,32x16:8,32x64:16,128x8:8,128x16:16,128x64:8
    (export GPTOSS_PDL=0; stress 60 32x8:8,32x64:16)
elif [ "$PART" = 41 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        tests/test_kernels_pdl.py -k "chain" -rfE 2>&1 | tail -6 | tee "$OUT/chain_tests.txt"
    timeout 100 python3 tools/chain_stress.py --calls 3000 --cases 32x8:8,32x64:16,128x8:8,128x64:8 2>&1 \
        | grep -v Warning | tee "$OUT/chain_stress.txt"
    for round in 1 2 3 4; do  # the 20b rows again and again: the spread of one figure between runs
        timeout 60 python3 -m gptoss_serve.kernels.bench --sections moe --tokens 8,64 --experts 32 2>&1 \
            | grep "^| MoE" | sort -u | tee -a "$OUT/bench_moe_rounds.txt"
    done
elif [ "$PART" = 42 ]; then
    timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_moe.py \
        tests/test_kernels_pdl.py tests/test_kernels_model.py tests/engine/test_engine_gpu.py -rfE \
        > "$OUT/tests_full.txt" 2>&1; tail -12 "$OUT/tests_full.txt"
    for round in 1 2 3; do  # the new bytes (this tree) and the old (OLD_TREE: a checkout of 108a724), in turn
        tree_rows new . 32 8,64; tree_rows old "$OLD_TREE" 32 8,64
    done
    tree_rows new . 128 1,8,64; tree_rows old "$OLD_TREE" 128 1,8,64
    tree_rows new . 32 1; tree_rows old "$OLD_TREE" 32 1
    engine_table "$OUT/engine.txt" 100
elif [ "$PART" = 43 ]; then
    one_token_ab 3
    timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_moe.py \
        tests/test_kernels_attention.py tests/test_kernels_model.py tests/test_kernels_norm_rope.py \
        tests/test_kernels_router.py tests/test_kernels_pdl.py tests/engine/test_engine_gpu.py -rfE \
        > "$OUT/tests_full.txt" 2>&1
    tail -12 "$OUT/tests_full.txt"
elif [ "$PART" = 44 ]; then
    layouts() {  # $1 time limit (s), $2 batches, $3 contexts
        decode_sweep "$1" decode_layouts.txt --layouts token,head --block-sizes 16,32 --rounds 2 --batches "$2" \
            --contexts "$3"
    }
    layouts 150 1,32 1024,8192,32768
    layouts 120 128 1024,8192
    one_token_ab 2
elif [ "$PART" = 46 ]; then
    timeout 130 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py \
        tests/test_kernels_pdl.py tests/test_kernels_model.py tests/engine/test_engine_gpu.py -k "not moe" -rfE \
        > "$OUT/tests.txt" 2>&1; tail -6 "$OUT/tests.txt"
    decode_rows 110
elif [ "$PART" = 47 ]; then
    engine_table "$OUT/engine.txt" 100
    decode_sweep 70 decode_splits.txt --layouts head --block-sizes 16,32 --fused-merge 0,1 --splits 0,1,4 --rounds 1 \
        --batches 32 --contexts 1024
elif [ "$PART" = 48 ]; then
    # the most telling first: a call cut short still brings them back
    decode_variants 40 decode_slices.txt 32,128 1024 1 1,2 plan
    decode_variants 40 decode_slices.txt 1 32768 0 32,64,128 plan
    decode_variants 120 decode_slices.txt 16,64 1024,2048 1 1,2,4 plan
    decode_variants 60 decode_slices.txt 1 8192 0 16,32,64,128 plan
elif [ "$PART" = 49 ]; then
    layout_run() {  # $1 label, $2 tree
        (cd "$2" && PYTHONPATH="$PWD" engine_run 100) | grep -E "^ours" | sed "s/^/$1 /" \
            | tee -a "$OUT/engine_layouts.txt"
    }
    head_and_token_rounds layout_run "${ROUNDS:-2}"  # ROUNDS=1: one run each
elif [ "$PART" = 50 ]; then
    timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py -rfE \
        > "$OUT/tests_attention.txt" 2>&1; tail -4 "$OUT/tests_attention.txt"
    decode_variants 45 decode_head_groups.txt 32 1024 0 0 plan,:::2,:::4,:8::
    decode_variants 45 decode_head_groups.txt 1 32768 0 32,64 plan,:::2,:::4
    decode_variants 30 decode_head_groups.txt 1 32768 0 128 plan,64:::2
    decode_variants 40 decode_head_groups.txt 1 8192 0 32,64 plan,:::2,:::4
    decode_variants 30 decode_head_groups.txt 1 1024 0 0 plan,:::2,:::4,:::8
    decode_variants 30 decode_head_groups.txt 128 1024 0 0 plan,:::2
    decode_variants 45 decode_head_groups.txt 32,64 2048 0 0,4 plan,64:::,128:::
    ROUNDS=1 bash "$0" 49
elif [ "$PART" = 51 ]; then
    for round in 1 2; do
        for layout in head token; do
            timeout 70 python3 -m gptoss_serve.kernels.bench --sections prefill,attention-front --tokens 1024 \
                --kv-layout "$layout" 2>&1 | grep -E "^\| (prefill|norm)|^HBM" | sed "s/^/$layout /" \
                | tee -a "$OUT/prefill_layouts.txt"
        done
    done
    ROUNDS=2 bash "$0" 49
    decode_rows 110
elif [ "$PART" = 52 ]; then
    prefill_run() {  # $1 label, $2 tree: bench offline's --profile-prefill, summarized
        (cd "$2" && PYTHONPATH="$PWD" timeout 100 python3 -m gptoss_serve.cluster.engine.cli bench offline \
            --preset gpt-oss-20b --random-weights --kernels triton --num-prompts 1 --input-len 1024 --output-len 2 \
            --profile-prefill 2>&1) | grep '"wall_ms"' | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(sys.argv[1], "wall ms", r["wall_ms"], "median", r["wall_ms_median"], "profiled", round(r["profiled_wall_ms"], 2),
      "GPU ms", round(r["gpu_ms"], 2))
for name, ms, count in r["top_kernels_ms"][:15]:
    print(sys.argv[1], f"  {ms:8.3f} ms {count:4d}x {name}")' "$1" | tee -a "$OUT/prefill_profile.txt"
    }
    head_and_token_rounds prefill_run "${ROUNDS:-2}"
elif [ "$PART" = 53 ]; then
    decode_variants 75 decode_short_rows.txt 32 1024 0 0 plan,128:4:3,64::,64::3,64::4,128:2:  # the line's row first
    decode_variants 90 decode_short_rows.txt 1 32768 0 64,96,128 plan,128::,64::
    decode_variants 60 decode_short_rows.txt 1 32768 0 32,64 64::3,64::4,128::3
    decode_variants 60 decode_short_rows.txt 1 1024 0,1 4,8,16 plan
    decode_variants 60 decode_short_rows.txt 1 8192 0,1 16,32,64 plan
    timeout 60 python3 -m gptoss_serve.kernels.bench --sections attention-front 2>&1 | grep -v Warning \
        | grep -E "^\| (norm|attention)|^HBM" | tee "$OUT/bench_attention_front.txt"  # re-timed after 1c95f72
elif [ "$PART" = 54 ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py -k "decode or pdl" \
        -rfE > "$OUT/tests_attention.txt" 2>&1; tail -3 "$OUT/tests_attention.txt"
    decode_variants 60 decode_stages.txt 32 1024 0 0 plan,128::3,128::4,64::3,64::4
    decode_variants 90 decode_stages.txt 1 32768 0 32,64 plan,128::3,128::4,64::3,64::4
    decode_variants 50 decode_stages.txt 128 1024 0 0 plan,64::3,64::4,128::3
    decode_variants 60 decode_stages.txt 32 8192,32768 0 0 plan,::3,::4
    decode_variants 40 decode_stages.txt 128 8192 0 0 plan,::3,::4
    decode_variants 50 decode_stages.txt 1 1024,8192 0 0 plan,::3,::4
    decode_variants 50 decode_stages.txt 128 32768 0 0 plan,::3
    (cd "$OLD_TREE" && PYTHONPATH="$PWD" decode_sweep 100 decode_stages_old.txt --layouts head --splits 0 \
        --tiles plan --rounds 2 --batches 1,32,128 --contexts 1024,8192,32768)
elif [ "$PART" = 55 ]; then
    timeout 150 python3 tools/attention_prefill_sweep.py --configs \
        default,:::3:0,:::3:1,::8:2:0,::8:3:0,::8:3:1,::8:4:1,:128:8:3:1,256::8:3:1 2>&1 | grep -E "^\||^bf16" \
        | tee "$OUT/prefill_sweep.txt"
    timeout 70 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py -rfE \
        > "$OUT/tests.txt" 2>&1; tail -4 "$OUT/tests.txt"  # all of it on CUDA tensors, carried pages too
elif [ "$PART" = 56 ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py \
        tests/test_kernels_pdl.py -k "decode" -rfE > "$OUT/tests_decode.txt" 2>&1; tail -3 "$OUT/tests_decode.txt"
    decode_variants 60 decode_early.txt 32 1024 0 0 plan,:::1,plan,:::1  # the line's row first, four rounds
    decode_variants 80 decode_early.txt 1 32768 0 0,66,132 plan,:::1,:::1:1,64:::1:1
    decode_variants 50 decode_early.txt 1 1024,8192 0 0 plan,:::1
    decode_variants 40 decode_early.txt 1 8192 0 66 :::1:1,128:::1:1
    decode_variants 60 decode_early.txt 128,32 1024,8192 0 0 plan,:::1
    timeout 80 python3 tools/attention_decode_sweep.py --profile --batches 1,32 --contexts 1024,32768 --splits 0 \
        --tiles plan,:::1 2>&1 | grep -E "^\||^copy" | tee "$OUT/decode_profile.txt"
elif [ "$PART" = 57 ]; then
    for layers in 4 24; do
        decode_sweep 50 decode_layers.txt --layouts head --fused-merge 0,1 --splits 0 --tiles plan --rounds 2 \
            --batches 1 --contexts 32768,8192,1024 --layers "$layers"
        decode_sweep 35 decode_layers.txt --layouts head --fused-merge 0 --splits 0 --tiles plan --rounds 2 \
            --batches 32 --contexts 1024 --layers "$layers"
    done
    timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py \
        tests/test_kernels_pdl.py -k "last_slice or decode_attention_with_pdl" -rfE > "$OUT/tests_decode.txt" 2>&1
    tail -3 "$OUT/tests_decode.txt"
    decode_variants 40 decode_early.txt 32,64 1024,2048 0 0 plan,:::1  # EARLY_META in the one-wave branch
    timeout 100 python3 -m gptoss_serve.kernels.bench --sections decode --decode-layers 24 \
        --json "$OUT/bench_decode_24.json" 2>&1 | grep -v Warning | grep -E "^decode attn|^\| decode|^HBM" \
        | tee "$OUT/bench_decode_24.txt"
    timeout 70 python3 tools/attention_prefill_sweep.py --configs default,64:64:4:2,64:64:4:3,128:32:4:2 2>&1 \
        | grep -E "^\||^bf16" | tee "$OUT/prefill_sweep.txt"  # 64 rows: 168 registers, 3 programs a SM (254: 2)
elif [ "$PART" = 58 ]; then
    for layers in 24 4; do
        timeout 90 python3 -m gptoss_serve.kernels.bench --sections moe --tokens 1,8,64 --moe-layers "$layers" \
            2>&1 | grep -v Warning | grep -E "^\| MoE|^HBM" | tee -a "$OUT/bench_moe_layers.txt"
        timeout 90 python3 -m gptoss_serve.kernels.bench --sections moe-launches --tokens 1 --moe-layers "$layers" \
            2>&1 | grep -v Warning | grep -E "^MoE|^HBM|^launches" | tee -a "$OUT/moe_floor_layers.txt"
    done
    timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_attention.py -k prefill -rfE \
        > "$OUT/tests_prefill.txt" 2>&1; tail -3 "$OUT/tests_prefill.txt"  # 32-key blocks at the window too
    timeout 60 python3 tools/attention_prefill_sweep.py --configs default,:64 2>&1 | grep -E "^\||^bf16" \
        | tee "$OUT/prefill_sweep.txt"  # the default takes 32-key blocks at the window since 5bd0e2c
elif [ "$PART" = 59 ]; then  # the sweep first: what comes back if the call is cut short
    timeout 100 python3 tools/moe_mma_sweep.py --cases 32x1,128x1 --no-gemv \
        --mma-async "${ASYNC_SPECS:-1,2,2:32,2:16:1}" 2>&1 | grep -v Warning | tee "$OUT/mma_async_sweep.txt"
    moe_gpu_tests "mma and not wgmma" 90
    # two groups, the second matmul's copies early (the default's rows: part 58, 24 launches a graph)
    GPTOSS_MMA_ASYNC_GROUPS=2 GPTOSS_MMA_EARLY_WEIGHTS=1 timeout 55 python3 -m gptoss_serve.kernels.bench \
        --sections moe --tokens 1,2,4 --moe-layers 24 2>&1 | grep -v Warning | grep -E "^\| MoE|^HBM" \
        | tee "$OUT/bench_moe_async.txt"
elif [ "$PART" = 60 ]; then
    moe_gpu_tests "mma_fused" 200
    timeout 200 python3 tools/moe_mma_sweep.py --cases 32x1,128x1 --no-gemv --mma-async 2:16:1 \
        --fused "${FUSED_SPECS:-16:6:8,16:6:8:1,16:8:8:1,16:6:16,16:6:16:1,16:6:4,32:4:8}" 2>&1 | grep -v Warning \
        | tee "$OUT/mma_fused_sweep.txt"
    (export GPTOSS_MMA_FUSED=1; stalls fused1 _moe_fused 2 1)  # its default config: DRAM throughput, issue rate
else
    timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_router.py \
        tests/test_observability_metrics.py -rfE 2>&1 | tail -15 | tee "$OUT/tests_router.txt"
    timeout 120 python3 -m gptoss_serve.kernels.bench --sections router --json "$OUT/bench_router.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench_router.txt"
    timeout 150 python3 -m gptoss_serve.kernels.bench --sections moe-launches --quick 2>&1 | grep -v Warning \
        | tee "$OUT/moe_launches.txt"
    (export GPTOSS_FUSED_ROUTER_MAX_TOKENS=0; engine_bench "$OUT/engine_no_fused_router.txt")
fi
