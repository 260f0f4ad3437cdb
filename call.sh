#!/bin/bash
cd build && ln -sf libflashmoe.so.0.1.0 libflashmoe.so.0 && ln -sf libflashmoe.so.0 libflashmoe.so && cd ..
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/build
export FLASHMOE_CACHE_DIR=$PWD/build/kc8
export FLASHMOE_DB=$OUT/t.sqlite
export FLASHMOE_SHIPPED_DB=$PWD/build/flashmoe-shipped.sqlite
nvidia-smi --query-gpu=name --format=csv,noheader
FM_TEST_MOE_PIPE=ws timeout 150 stdbuf -oL build/tests/test_moe_gpu > $OUT/test_moe_ws.log 2>&1; rc=$?; echo "moe ws rc=$rc"; tail -1 $OUT/test_moe_ws.log; grep -m3 FAIL $OUT/test_moe_ws.log
[ $rc = 0 ] || exit 1
F=build/fmtune
T="--op moe --gpu auto --preset deepseek-v3 --families moe_gemm_sm90 --db $OUT/ab.sqlite --runs 10"
timeout 200 $F $T --tokens 16384 --match _sk1_slot_ws --sustained 16 > $OUT/ab16k.log 2>&1
timeout 100 $F $T --tokens 4096 --match _sk1_slot_ws --sustained 12 > $OUT/ab4k.log 2>&1
grep -h "^best" $OUT/ab*.log
