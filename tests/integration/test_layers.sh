#!/usr/bin/env bash
# The layer rule (tests/tools/check_layers.py, `make check-layers`): the tree
# passes, and a copy of it with a planted wrong-way include (util -> engine's
# sweep.h) fails, naming the file and the include.
set -u
root=${PS_ROOT:?}
py=${PS_PYTHON:-/usr/bin/python3}
pass=0; fail=0
check() { # NAME STATUS [DETAIL]
    if [ "$2" -eq 0 ]; then pass=$((pass + 1)); echo "ok   $1"
    else fail=$((fail + 1)); echo "FAIL $1${3:+: $3}"; fi
}
tmp=$(mktemp -d /tmp/ps-layers-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

out=$("$py" "$root/tests/tools/check_layers.py" "$root" 2>&1)
check "the tree keeps the layer rule" $? "$out"

mkdir -p "$tmp/tree"
cp -r "$root/src" "$root/include" "$tmp/tree/"
"$py" "$root/tests/tools/check_layers.py" "$tmp/tree" >"$tmp/clean.log" 2>&1
clean=$?
sed -i '0,/^#include/s//#include "sweep.h"\n#include/' "$tmp/tree/src/util/strutil.c"
out=$("$py" "$root/tests/tools/check_layers.py" "$tmp/tree" 2>&1)
rc=$?
check "a planted util -> engine include fails (exit 1)" "$([ $rc -eq 1 ]; echo $?)" "exit $rc: $out"
check "and names the file and the include" \
    "$(echo "$out" | grep -q '^src/util/strutil.c:[0-9]*: #include "sweep.h": util may not depend on engine'; echo $?)" \
    "$out"
# the copy differs from the tree by the planted line alone
n_tree=$(grep -c . "$tmp/clean.log"); n_planted=$(echo "$out" | grep -c .)
check "exactly one more line than the unplanted copy" "$([ $((n_tree + 1)) -eq "$n_planted" ] && [ $clean -le 1 ]; echo $?)" \
    "$n_tree vs $n_planted lines"

echo "layers: $pass passed, $fail failed, 0 skipped"
[ "$fail" -eq 0 ]
