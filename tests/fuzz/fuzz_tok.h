/*
 * The GPT-2 tokenizer the tokenizer and dataset targets share, loaded once
 * per process from $PATCHSWEEP_TOKENIZER, else the directory `make
 * tokenizer` fills (PS_TOKENIZER_DIR), by LLVMFuzzerInitialize (a target that
 * includes this header gets it).  It stays loaded until exit, so
 * LeakSanitizer sees it as reachable, not leaked.
 */
#ifndef PS_FUZZ_TOK_H
#define PS_FUZZ_TOK_H

#include <stdio.h>
#include <stdlib.h>

#include "err.h"
#include "tokenizer.h"

static tokenizer *fuzz_tok;

static inline void fuzz_tok_load(void)
{
    const char *dir = getenv("PATCHSWEEP_TOKENIZER");
    if (!dir || !*dir)
        dir = PS_TOKENIZER_DIR;
    if (tokenizer_load_dir(&fuzz_tok, dir) != PS_OK) {
        fprintf(stderr, "fuzz: cannot load the tokenizer (run 'make tokenizer'): %s\n", err_msg());
        exit(1);
    }
}

/* libFuzzer calls this once before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_tok_load();
    return 0;
}

#endif
