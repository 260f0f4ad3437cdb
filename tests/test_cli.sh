#!/bin/sh
# test_cli.sh FMTUNE WORKDIR - the command line on bad input: a clear message, a non-zero exit,
# and nothing written. Also list, db export/import round trip, and (without a GPU) the
# compile-everything-then-refuse path; with a GPU, a --gpu that names another card.
fmtune=$1
work=$2
rm -rf "$work" && mkdir -p "$work" || exit 1
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

# expect CODE PATTERN -- ARGS...: exit code CODE and PATTERN in stderr+stdout
expect() {
  code=$1; pattern=$2; shift 3
  out=$("$fmtune" "$@" 2>&1); rc=$?
  if [ "$rc" != "$code" ]; then bad "fmtune $* exited $rc, wanted $code: $out"; return; fi
  if ! printf '%s' "$out" | grep -q -- "$pattern"; then bad "fmtune $*: no '$pattern' in: $out"; return; fi
  ok
}
db="$work/tuning.sqlite"
expect 0 "usage: fmtune" -- --help
expect 2 "unknown option '--bogus'" -- --gpu auto --shape 8x4096x128 --bogus --db "$db"
expect 2 "expected BATCHxSEQLENxHEADDIM" -- --gpu auto --shape 8x4096 --db "$db"
expect 2 "expected BATCHxSEQLENxHEADDIM" -- --gpu auto --shape 8x4096x128x2 --db "$db"
expect 2 "head dim 96 is not supported" -- --gpu auto --shape 8x4096x96 --db "$db"
expect 2 "must be positive" -- --gpu auto --shape 0x4096x128 --db "$db"
expect 2 "not a multiple of --kv-heads" -- --gpu auto --shape 1x128x128 --heads 16 --kv-heads 5 --db "$db"
expect 2 "bf16 or fp16" -- --gpu auto --shape 1x128x128 --dtype fp32 --db "$db"
expect 2 "--gpu is required" -- --shape 1x128x128 --db "$db"
expect 2 "--shape is required" -- --gpu auto --db "$db"
expect 2 "needs a positive integer" -- --gpu auto --shape 1x128x128 --heads -3 --db "$db"
expect 2 "needs a value" -- --gpu auto --shape
expect 2 "attn or moe" -- --op conv --gpu auto --shape 1x128x128 --db "$db"
expect 2 "0 (off) or a number of candidates in 2..64" -- --gpu auto --shape 1x128x128 --sustained 1 --db "$db"
expect 2 "contradict each other" -- --gpu auto --shape 1x128x128 --rerank --retune --db "$db"
expect 2 "needs sustained-load timing" -- --gpu auto --shape 1x128x128 --rerank --sustained 0 --db "$db"
expect 2 "no variant name contains" -- --gpu auto --shape 1x64x64 --match no_such_variant --db "$db"
[ -e "$db" ] && bad "a rejected command created $db" || ok

# databases: missing, corrupt (left untouched), not ours
expect 4 "no database at" -- db show --db "$work/missing.sqlite"
[ -e "$work/missing.sqlite" ] && bad "db show created a database" || ok
head -c 8192 /dev/urandom > "$work/corrupt.sqlite"
sum_before=$(cksum < "$work/corrupt.sqlite")
expect 4 "database" -- db show --db "$work/corrupt.sqlite"
expect 4 "database" -- db import --db "$work/corrupt.sqlite" "$work/corrupt.sqlite"
expect 4 "database" -- --gpu auto --shape 1x64x64 --db "$work/corrupt.sqlite" --max-variants 1 --families attn_fwd_sm80
[ "$(cksum < "$work/corrupt.sqlite")" = "$sum_before" ] && ok || bad "corrupt database was modified"
expect 2 "cannot read" -- db import --db "$db" "$work/no-such-dump.sql"
[ -e "$db" ] && bad "import of a missing dump created $db" || ok
expect 2 "unknown subcommand" -- db frobnicate --db "$db"

# the space, with culls and reasons
out=$("$fmtune" list --op attn --arch 90 --dtype bf16 --head-dim 128 2>&1); rc=$?
[ $rc = 0 ] && ok || bad "list exited $rc"
printf '%s' "$out" | grep -q "kept   attn_fwd_sm80_bf16_d128" && ok || bad "list shows no kept sm80 variant"
printf '%s' "$out" | grep -q "culled " && ok || bad "list shows no culled variant"
printf '%s' "$out" | grep -q "total for attn_fwd on sm_90" && ok || bad "list has no total"

# export / import round trip of an empty database and of the shipped one
if [ -n "$FLASHMOE_SHIPPED_DB" ] && [ -e "$FLASHMOE_SHIPPED_DB" ]; then
  "$fmtune" db export --db "$FLASHMOE_SHIPPED_DB" -o "$work/a.sql" && ok || bad "export"
  "$fmtune" db import --db "$work/rt.sqlite" "$work/a.sql" && ok || bad "import"
  "$fmtune" db export --db "$work/rt.sqlite" -o "$work/b.sql" && ok || bad "export 2"
  cmp -s "$work/a.sql" "$work/b.sql" && ok || bad "export/import/export differs"
  "$fmtune" db merge --db "$work/rt.sqlite" "$FLASHMOE_SHIPPED_DB" && ok || bad "merge"
  "$fmtune" db export --db "$work/rt.sqlite" -o "$work/c.sql" && ok || bad "export 3"
  cmp -s "$work/a.sql" "$work/c.sql" && ok || bad "merging the same data changed the database"
fi

if [ -e /dev/nvidiactl ] || [ -e /dev/nvidia0 ]; then
  # a GPU is here: name a card it is not
  expect 3 "does not match the GPU present" -- --gpu a100 --shape 1x64x64 --db "$db"
  [ -e "$db" ] && bad "a GPU mismatch created $db" || ok
else
  # no GPU: everything is still rendered and compiled, then a one-line refusal, exit 1
  out=$("$fmtune" --gpu h100 --shape 1x100x64 --db "$db" 2>&1); rc=$?
  [ $rc = 1 ] && ok || bad "no-GPU tune exited $rc: $out"
  printf '%s' "$out" | grep -q "compiled [1-9][0-9]* (" && ok || bad "no-GPU tune compiled nothing: $out"
  printf '%s' "$out" | grep -q "0 failed" && ok || bad "no-GPU tune had compile failures: $out"
  printf '%s' "$out" | tail -n 1 | grep -q "no GPU to measure on" && ok || bad "no one-line reason last: $out"
  [ -e "$db" ] && bad "a run without a GPU created $db" || ok
  # --match keeps only the named variants (here the two-CTAs-per-SM ones of the Hopper family)
  out=$("$fmtune" --gpu h100 --shape 1x100x64 --causal --families attn_fwd_sm90 --match _x2 --db "$db" 2>&1); rc=$?
  [ $rc = 1 ] && ok || bad "no-GPU --match tune exited $rc: $out"
  printf '%s' "$out" | grep -q -- "--match _x2: [1-9][0-9]* of [1-9][0-9]* variants" && ok || bad "--match did not report its filter: $out"
  printf '%s' "$out" | grep -q "would time [1-9][0-9]* variants" && ok || bad "--match: nothing left to time: $out"
fi
echo "$pass passed, $fail failed"
[ $fail = 0 ]
