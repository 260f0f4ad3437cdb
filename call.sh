#!/bin/bash
cd build && ln -sf libflashmoe.so.0.1.0 libflashmoe.so.0 && ln -sf libflashmoe.so.0 libflashmoe.so && cd ..
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/build
export FLASHMOE_CACHE_DIR=$PWD/build/kc7
export FLASHMOE_DB=$OUT/t.sqlite
export FLASHMOE_SHIPPED_DB=$PWD/build/flashmoe-shipped.sqlite
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 400 python3 bench/bench_moe.py --lib build/libflashmoe.so --out $OUT > $OUT/bench_moe.log 2>&1; echo "bench rc=$?"
tail -12 $OUT/bench_moe.log
