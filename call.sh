#!/bin/bash
cd build && ln -sf libflashmoe.so.0.1.0 libflashmoe.so.0 && ln -sf libflashmoe.so.0 libflashmoe.so && cd ..
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/build
export FLASHMOE_CACHE_DIR=$PWD/build/kc9
export FLASHMOE_DB=$OUT/t.sqlite
export FLASHMOE_SHIPPED_DB=$PWD/build/flashmoe-shipped.sqlite
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/attn $OUT/moe
timeout 280 python3 bench/bench_attn.py --lib build/libflashmoe.so --out $OUT/attn > $OUT/attn/bench.log 2>&1; echo "attn rc=$?"
tail -8 $OUT/attn/bench.log
timeout 200 python3 bench/bench_moe.py --lib build/libflashmoe.so --out $OUT/moe > $OUT/moe/bench.log 2>&1; echo "moe rc=$?"
tail -9 $OUT/moe/bench.log
