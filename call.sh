#!/bin/bash
cd build && ln -sf libflashmoe.so.0.1.0 libflashmoe.so.0 && ln -sf libflashmoe.so.0 libflashmoe.so && cd ..
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/build
export FLASHMOE_CACHE_DIR=$PWD/build/kc6
export FLASHMOE_DB=$OUT/t.sqlite
export FLASHMOE_SHIPPED_DB=$PWD/build/flashmoe-shipped.sqlite
nvidia-smi --query-gpu=name --format=csv,noheader
build/fmtune --op moe --gpu auto --preset deepseek-v3 --tokens 16384 --families moe_gemm_sm90 --match _ws_tiles --runs 10 --sustained 12 --db $FLASHMOE_DB > $OUT/tune16384.log 2>&1
grep "^best" $OUT/tune16384.log
python3 -c "import sqlite3;c=sqlite3.connect('$OUT/t.sqlite');c.execute('pragma wal_checkpoint(TRUNCATE)')"
timeout 420 python3 bench/bench_moe.py --lib build/libflashmoe.so --out $OUT > $OUT/bench_moe.log 2>&1; echo "bench rc=$?"
tail -12 $OUT/bench_moe.log
