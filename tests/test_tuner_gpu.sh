#!/bin/sh
# test_tuner_gpu.sh FMTUNE SERVE_CHECK WORKDIR - fmtune end to end on a small shape, resuming,
# then a program using the C API is served that shape from the database and computes it right.
fmtune=$1
serve=$2
work=$3
if ! [ -e /dev/nvidiactl ] && ! [ -e /dev/nvidia0 ]; then
  echo "SKIP: no GPU on this machine (test_tuner_gpu needs one)"
  exit 77
fi
rm -rf "$work" && mkdir -p "$work" || exit 1
db="$work/tuning.sqlite"
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

"$fmtune" --gpu auto --shape 2x1000x128 --heads 4 --kv-heads 2 --causal --db "$db" --runs 5 \
  --max-variants 6 > "$work/out1" 2> "$work/err1"; rc=$?
cat "$work/out1"
[ $rc = 0 ] && ok || { bad "tune exited $rc"; tail -n 30 "$work/err1"; }
grep -q "^best for attn_fwd bf16 b=2,sq=1000,sk=1000,h=4,hkv=2,d=128,causal=1" "$work/out1" && ok || bad "no best line"
"$fmtune" --gpu auto --shape 2x1000x128 --heads 4 --kv-heads 2 --causal --db "$db" --runs 5 \
  --max-variants 6 > "$work/out2" 2> "$work/err2"; rc=$?
[ $rc = 0 ] && ok || bad "second run exited $rc"
grep -q "already measured" "$work/err2" && ok || bad "second run did not resume"
# a second sustained phase (--retune times every variant again) decides the key: the first
# phase's sustained rows are superseded
"$fmtune" --gpu auto --shape 2x1000x128 --heads 4 --kv-heads 2 --causal --db "$db" --runs 5 \
  --max-variants 6 --retune > "$work/out3" 2> "$work/err3"; rc=$?
[ $rc = 0 ] && ok || bad "retune exited $rc"
grep -q "sustained-load timings of earlier runs superseded" "$work/err3" && ok ||
  { bad "the second sustained phase superseded nothing"; tail -n 20 "$work/err3"; }
"$fmtune" db show --db "$db" | grep -q "attn_fwd" && ok || bad "db show lists nothing"
"$serve" "$db" 2 1000 128 4 2 1 && ok || bad "the runtime was not served the tuned shape"
# a variant that takes the worker down is recorded as a fault, and the others are still measured
FMTUNE_TEST_CRASH=1 "$fmtune" --gpu auto --shape 1x300x64 --heads 2 --db "$work/crash.sqlite" --runs 3 \
  --max-variants 4 > "$work/out3" 2> "$work/err3"; rc=$?
[ $rc = 0 ] && ok || { bad "tune with a crashing variant exited $rc"; tail -n 20 "$work/err3"; }
grep -q " fault " "$work/err3" && ok || bad "the crash was not recorded as a fault"
[ "$(grep -c " ok " "$work/out3")" -ge 1 ] && ok || bad "no variant measured after the crash"
"$fmtune" db show --db "$work/crash.sqlite" | grep -q "fault" && ok || bad "the fault is not in the database"
# --sustained: the fastest three re-timed under load, best chosen among them, burst rows superseded
"$fmtune" --gpu auto --shape 4x2048x128 --heads 8 --db "$work/sustained.sqlite" --runs 5 \
  --max-variants 5 --sustained 3 > "$work/out4" 2> "$work/err4"; rc=$?
[ $rc = 0 ] && ok || { bad "tune --sustained exited $rc"; tail -n 20 "$work/err4"; }
grep -q "configuration (sustained load)" "$work/err4" && ok || bad "no sustained table"
grep -q "burst timings of this shape superseded" "$work/err4" && ok || bad "burst timings not superseded"
"$fmtune" db export --db "$work/sustained.sqlite" -o "$work/sustained.sql" && ok || bad "db export failed"
[ "$(grep -c "superseded by sustained" "$work/sustained.sql")" -ge 2 ] && ok ||
  bad "the superseded rows are not in the database"
# a database timed in bursts only (--sustained 0) is re-ranked under load by the same command
# without it (the default), from the timings it holds; a third run has nothing new to re-time
args="--gpu auto --shape 2x1024x64 --heads 8 --db $work/resume.sqlite --runs 5 --max-variants 4"
"$fmtune" $args --sustained 0 > "$work/out5" 2> "$work/err5"; rc=$?
[ $rc = 0 ] && ok || { bad "tune --sustained 0 exited $rc"; tail -n 20 "$work/err5"; }
grep -q "configuration (sustained load)" "$work/err5" && bad "--sustained 0 still timed under load" || ok
"$fmtune" $args > "$work/out6" 2> "$work/err6"; rc=$?
[ $rc = 0 ] && ok || { bad "resumed tune exited $rc"; tail -n 20 "$work/err6"; }
grep -q "already measured" "$work/err6" && ok || bad "the default run did not resume"
grep -q "configuration (sustained load)" "$work/err6" && ok || bad "resumed burst timings not re-timed under load"
grep -q "burst timings of this shape superseded" "$work/err6" && ok || bad "resumed burst timings not superseded"
"$fmtune" $args > "$work/out7" 2> "$work/err7"; rc=$?
[ $rc = 0 ] && ok || bad "third tune exited $rc"
grep -q "configuration (sustained load)" "$work/err7" && bad "nothing new, yet timed under load again" || ok
# --rerank times nothing new: the database's burst rows of the shape, re-ranked under load
args="--gpu auto --shape 2x700x128 --heads 4 --db $work/rerank.sqlite --runs 5 --max-variants 3"
"$fmtune" $args --rerank > "$work/out8" 2> "$work/err8"; rc=$?
[ $rc = 0 ] && ok || bad "--rerank on an empty database exited $rc"
grep -q "no burst timing of this shape left" "$work/err8" && ok || bad "--rerank with nothing to re-rank did not say so"
"$fmtune" $args --sustained 0 > "$work/out9" 2> "$work/err9" && ok || bad "burst-only tune failed"
"$fmtune" --gpu auto --shape 2x700x128 --heads 4 --db "$work/rerank.sqlite" --rerank > "$work/out10" 2> "$work/err10"; rc=$?
[ $rc = 0 ] && ok || { bad "--rerank exited $rc"; tail -n 20 "$work/err10"; }
grep -q "nothing new is timed" "$work/err10" && ok || bad "--rerank did not say what it does"
grep -q "configuration (sustained load)" "$work/err10" && ok || bad "--rerank timed nothing under load"
grep -q "fmtune: measured 0 variants" "$work/err10" && ok || bad "--rerank timed new variants in bursts"
echo "$pass passed, $fail failed"
[ $fail = 0 ]
