#!/bin/bash
cd build && ln -sf libflashmoe.so.0.1.0 libflashmoe.so.0 && ln -sf libflashmoe.so.0 libflashmoe.so && cd ..
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/build
export FLASHMOE_CACHE_DIR=$PWD/build/kc8
export FLASHMOE_SHIPPED_DB=$PWD/build/flashmoe-shipped.sqlite
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/before $OUT/after
# before: the shipped entries only
FLASHMOE_DB=$OUT/empty.sqlite timeout 120 python3 bench/bench_moe.py --lib build/libflashmoe.so --out $OUT/before --preset mixtral-8x7b --tokens 4096,16384 --no-naive > $OUT/before/bench.log 2>&1; echo "before rc=$?"
F=build/fmtune
T="--op moe --gpu auto --preset mixtral-8x7b --families moe_gemm_sm90 --db $OUT/t.sqlite --runs 10"
timeout 150 $F $T --tokens 16384 --match _ws --sustained 12 > $OUT/tune16k.log 2>&1
timeout 100 $F $T --tokens 4096 --match _ws --sustained 12 > $OUT/tune4k.log 2>&1
grep -h "^best" $OUT/tune*.log
python3 -c "import sqlite3;c=sqlite3.connect('$OUT/t.sqlite');c.execute('pragma wal_checkpoint(TRUNCATE)')"
FLASHMOE_DB=$OUT/t.sqlite timeout 120 python3 bench/bench_moe.py --lib build/libflashmoe.so --out $OUT/after --preset mixtral-8x7b --tokens 4096,16384 --no-naive > $OUT/after/bench.log 2>&1; echo "after rc=$?"
tail -4 $OUT/before/bench.log; tail -4 $OUT/after/bench.log
