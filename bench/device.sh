#!/bin/sh
# bench/device.sh STAGE... - what one call on the GPU machine runs, from a build folder made on
# the development machine and carried along (build/). Writes logs under $OUT.
#   info      the card, driver, clocks as found (never changed)
#   tests     the GPU tests (ctest -L gpu)
#   gputests  the same three run directly (no ctest paths needed), each timed, its log in $OUT
#             (GPU_TESTS: which of attention moe tuner, in that order by default)
#   attn      GPU attention correctness only (test_attention_gpu), FM_TEST_FAMILY may restrict it
#   tune      fmtune --gpu auto --shape 8x4096x128 (the mission), then the served check
#   tunegrid  fmtune over the benchmark grid (GRID_DIMS, GRID_SEQS, GRID_CAUSAL, GRID_FAMILIES,
#             GRID_ARGS)
#   retune    fmtune over the benchmark grid and the mission, sm90 family, each (head dim, causal)
#             restricted to the tile shapes that won it on both cards so far (bench/NOTES.md)
#   shortgrid the grid's points below S = 4k over the whole sm90 family, resuming from a copy of
#             the shipped database ($OUT/short.sqlite): only the variants it lacks are timed in
#             bursts, then the fastest (SHORT_K, 6) are re-ranked under sustained load
#             (SHORT_DIMS, SHORT_CAUSAL, SHORT_SEQS restrict it; SHORT_DB: start from that copy;
#             SHORT_MISSION=1 adds the mission shape 8x4096x128; SHORT_ARGS more fmtune options,
#             e.g. --retune)
#   shortab   bench_attn on those points: the shipped database against $OUT/short.sqlite, one
#             process, interleaved
#   dbab      bench_attn over the grid (BENCH_ONLY: its --only points): the shipped database
#             against AB_DB (e.g. the same entries moved to a new axis value), one process,
#             interleaved
#   moererank fmtune --rerank (no new burst timings; the database's fastest re-ranked under
#             sustained load) of the Qwen3-30B-A3B and Mixtral-8x7B buckets RERANK_TOKENS (16 1024),
#             on a copy of the shipped database ($OUT/rerank.sqlite)
#   moeab     bench_moe on those presets and buckets: the shipped database against
#             $OUT/rerank.sqlite, one process, interleaved
#   bench     bench/bench_attn.py (flashmoe vs SDPA flash and cuDNN), table + PNG (BENCH_ONLY:
#             its --only points)
#   benchq    the same on a reduced grid
#   moetune   fmtune --op moe, per token bucket (MOE_TOKENS) of a preset (MOE_PRESET, DeepSeek-V3)
#   moe       bench/bench_moe.py
set -u
B=${BUILD:-build}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export FLASHMOE_CACHE_DIR=${FLASHMOE_CACHE_DIR:-$PWD/$B/kcache}
export FLASHMOE_DB=${FLASHMOE_DB:-$OUT/tuning.sqlite}
export FLASHMOE_SHIPPED_DB=$PWD/$B/flashmoe-shipped.sqlite
export PYTHONUNBUFFERED=1
# Kernels compiled on the development machine travel as one archive (cubins compress ~15x, and
# the carried tree is limited to 64 MiB); unpacked into the cache before anything runs.
if [ -f "$B/kcache.tgz" ]; then
  mkdir -p "$FLASHMOE_CACHE_DIR" && tar xzf "$B/kcache.tgz" -C "$FLASHMOE_CACHE_DIR" --strip-components=1
fi
for stage in "$@"; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    info)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/device.txt" ;;
    tests)
      (cd "$B" && ctest -L gpu --output-on-failure --timeout 900 2>&1) > "$OUT/ctest_gpu.log"
      grep -E "tests passed|Passed|Failed|\*\*\*" "$OUT/ctest_gpu.log" | tail -n 30 ;;
    gputests)
      for t in ${GPU_TESTS:-attention moe tuner}; do
        t0=$(date +%s)
        case $t in
          attention) "$B/tests/test_attention_gpu" > "$OUT/test_attention_gpu.log" 2>&1 ;;
          moe) "$B/tests/test_moe_gpu" > "$OUT/test_moe_gpu.log" 2>&1 ;;
          tuner) sh tests/test_tuner_gpu.sh "$B/fmtune" "$B/tests/fm_serve_check" /tmp/tuner-test \
                   > "$OUT/test_tuner_gpu.log" 2>&1 ;;
        esac
        rc=$?
        echo "test $t: rc=$rc, $(( $(date +%s) - t0 )) s"
        grep -E "FAIL|checks|passed|^B:|^C" "$OUT/test_${t}_gpu.log" | tail -n 8
      done ;;
    attn)
      "$B/tests/test_attention_gpu" > "$OUT/attn_gpu.log" 2>&1; echo "rc=$?"
      grep -E "FAIL|passed|device|^B:|reference" "$OUT/attn_gpu.log" | head -n 60 ;;
    tune)
      "$B/fmtune" --gpu auto --shape 8x4096x128 --db "$FLASHMOE_DB" > "$OUT/fmtune.log" 2>&1; echo "rc=$?"
      "$B/fmtune" --gpu auto --shape 8x4096x128 --causal --db "$FLASHMOE_DB" >> "$OUT/fmtune.log" 2>&1; echo "rc=$?"
      grep -E "^fmtune|^best|^tuning|^ *1 " "$OUT/fmtune.log" ;;
    tunegrid)
      fam=${GRID_FAMILIES:+--families $GRID_FAMILIES}
      for d in ${GRID_DIMS:-64 128 256}; do for c in ${GRID_CAUSAL:-0 1}; do
        [ "$c" = 1 ] && c=--causal || c=""
        for s in ${GRID_SEQS:-512 1024 2048 4096 8192 16384}; do
        "$B/fmtune" --gpu auto --shape $((16384 / s))x${s}x$d --heads $((2048 / d)) $c --db "$FLASHMOE_DB" \
          --runs 10 $fam ${GRID_ARGS:-} >> "$OUT/tunegrid.log" 2>&1
      done; done; done
      grep "^best" "$OUT/tunegrid.log" ;;
    retune)
      for d in 64 128 256; do for c in 0 1; do
        m=_m128_; [ $d = 64 ] && { [ $c = 0 ] && m=_m192_ || m=_sm90_; }
        cf=""; [ $c = 1 ] && cf=--causal
        for s in 512 1024 2048 4096 8192 16384; do
          "$B/fmtune" --gpu auto --shape $((16384 / s))x${s}x$d --heads $((2048 / d)) $cf --db "$FLASHMOE_DB" \
            --runs 10 --families attn_fwd_sm90 --match $m >> "$OUT/retune.log" 2>&1
        done
      done; done
      for cf in "" --causal; do
        "$B/fmtune" --gpu auto --shape 8x4096x128 $cf --db "$FLASHMOE_DB" --runs 10 --families attn_fwd_sm90 \
          --match _m128_ >> "$OUT/retune.log" 2>&1
      done
      grep "^best" "$OUT/retune.log" | sed 's/ (recorded.*//' ;;
    shortgrid)
      [ -e "$OUT/short.sqlite" ] || cp "${SHORT_DB:-$FLASHMOE_SHIPPED_DB}" "$OUT/short.sqlite"
      for d in ${SHORT_DIMS:-64 128 256}; do for c in ${SHORT_CAUSAL:-0 1}; do
        cf=""; [ "$c" = 1 ] && cf=--causal
        for s in ${SHORT_SEQS:-512 1024 2048}; do
          "$B/fmtune" --gpu auto --shape $((16384 / s))x${s}x$d --heads $((2048 / d)) $cf \
            --db "$OUT/short.sqlite" --runs 5 --families attn_fwd_sm90 --sustained ${SHORT_K:-6} \
            ${SHORT_ARGS:-} >> "$OUT/shortgrid.log" 2>&1
          echo "d=$d causal=$c s=$s rc=$? $(date +%T)"
        done
      done; done
      if [ -n "${SHORT_MISSION:-}" ]; then
        for c in ${SHORT_CAUSAL:-0 1}; do
          cf=""; [ "$c" = 1 ] && cf=--causal
          "$B/fmtune" --gpu auto --shape 8x4096x128 $cf --db "$OUT/short.sqlite" --runs 5 \
            --families attn_fwd_sm90 --sustained ${SHORT_K:-6} >> "$OUT/shortgrid.log" 2>&1
          echo "mission causal=$c rc=$? $(date +%T)"
        done
      fi
      grep "^best" "$OUT/shortgrid.log" | sed 's/ (recorded.*//' ;;
    shortab)
      pts=""
      for d in 64 128 256; do for c in 0 1; do for s in 512 1024 2048; do pts="$pts,$d:$c:$s"; done; done; done
      FLASHMOE_SHIPPED_DB=$OUT/short.sqlite python3 bench/bench_attn.py --lib "$B/libflashmoe.so" \
        --ref-lib "$B/libflashmoe.so" --ref-shipped-db "$FLASHMOE_SHIPPED_DB" --out "$OUT/shortab" \
        --only "${pts#,}" 2>&1 | tee "$OUT/shortab.log" | grep -E "^d=|ref|geometric" ;;
    dbab)
      FLASHMOE_SHIPPED_DB=$AB_DB python3 bench/bench_attn.py --lib "$B/libflashmoe.so" \
        --ref-lib "$B/libflashmoe.so" --ref-shipped-db "$FLASHMOE_SHIPPED_DB" --out "$OUT/dbab" \
        ${BENCH_ONLY:+--only $BENCH_ONLY} 2>&1 | tee "$OUT/dbab.log" | grep -E "^d=|ref|geometric" ;;
    moererank)
      [ -e "$OUT/rerank.sqlite" ] || cp "$FLASHMOE_SHIPPED_DB" "$OUT/rerank.sqlite"
      for ps in qwen3-30b-a3b mixtral-8x7b; do for t in ${RERANK_TOKENS:-16 1024}; do
        "$B/fmtune" --op moe --gpu auto --preset $ps --tokens $t --db "$OUT/rerank.sqlite" --rerank \
          --sustained 6 >> "$OUT/moererank.log" 2>&1
        echo "$ps T=$t rc=$? $(date +%T)"
      done; done
      grep -E "^best|no burst timing" "$OUT/moererank.log" | sed 's/ (recorded.*//' ;;
    moeab)
      tk=$(echo ${RERANK_TOKENS:-16 1024} | tr ' ' ,)
      for ps in qwen3-30b-a3b mixtral-8x7b; do
        FLASHMOE_SHIPPED_DB=$OUT/rerank.sqlite python3 bench/bench_moe.py --lib "$B/libflashmoe.so" \
          --ref-lib "$B/libflashmoe.so" --ref-shipped-db "$FLASHMOE_SHIPPED_DB" --preset $ps \
          --tokens $tk --no-naive --out "$OUT/moeab_$ps" 2>&1 | tee -a "$OUT/moeab.log" | tail -n 12
      done ;;
    bench)
      python3 bench/bench_attn.py --lib "$B/libflashmoe.so" --out "$OUT" ${BENCH_ONLY:+--only $BENCH_ONLY} 2>&1 | tee "$OUT/bench_attn.log" | tail -n 50 ;;
    benchq)
      python3 bench/bench_attn.py --lib "$B/libflashmoe.so" --out "$OUT" --quick 2>&1 | tee "$OUT/bench_attn.log" | tail -n 30 ;;
    moetune)
      for t in ${MOE_TOKENS:-16 1024 4096 16384}; do
        "$B/fmtune" --op moe --gpu auto --preset ${MOE_PRESET:-deepseek-v3} --tokens $t --db "$FLASHMOE_DB" \
          --runs 5 --budget ${MOE_BUDGET:-30} ${MOE_FAMILIES:+--families $MOE_FAMILIES} ${MOE_MATCH:+--match $MOE_MATCH} ${MOE_ARGS:-} >> "$OUT/moetune.log" 2>&1
        echo "T=$t rc=$?"
      done
      grep -E "^best|^fmtune: measured" "$OUT/moetune.log" ;;
    moe)
      python3 bench/bench_moe.py --lib "$B/libflashmoe.so" --out "$OUT" ${MOE_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_moe.log" | tail -n 30 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
