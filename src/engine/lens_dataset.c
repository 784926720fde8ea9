#include "lens_dataset.h"

#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "hooks.h"
#include "lens.h"
#include "ncout.h"
#include "ncout_lens.h"

/* The lens of tk[0..n) into f (made by ncout_create; the caller commits). */
static ps_status write_prompts(ncout_file *f, model *m, const tokenizer *tok, const dataset *d, size_t first,
                               const dataset_tokens *tk, size_t n, bool bos, size_t top_k)
{
    const size_t R = lens_n_rows(&m->cfg);
    forward_cache c = {0};
    lens_view v = {0};
    ncout_lens w;
    size_t max_T = 0;
    for (size_t i = 0; i < n; i++)
        max_T = tk[i].n_tokens > max_T ? tk[i].n_tokens : max_T;
    char(*label)[LENS_MAX_LABEL] = malloc(R * sizeof *label);
    char(*hook)[HOOK_MAX_NAME] = malloc(R * sizeof *hook);
    const char **label_p = malloc(R * sizeof *label_p), **hook_p = malloc(R * sizeof *hook_p);
    ncout_lens_answer *ans = malloc(R * sizeof *ans);
    ps_status st = PS_OK;
    if (!label || !hook || !label_p || !hook_p || !ans) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
        goto out;
    }
    for (size_t r = 0; r < R; r++) {
        lens_row_label(r, label[r]);
        hook_name(lens_row_hook(r), hook[r]);
        label_p[r] = label[r];
        hook_p[r] = hook[r];
    }
    if ((st = forward_cache_init(&c, &m->cfg, max_T, FORWARD_LOGITS_NONE)) ||
        (st = lens_view_init(&v, &m->cfg, R, top_k)) ||
        (st = ncout_lens_define(&w, f, m, R, label_p, hook_p, max_T, top_k, bos, d->path)))
        goto out;
    for (size_t i = 0; i < n; i++) {
        const size_t T = tk[i].n_tokens;
        if ((st = forward_run(m, &c, tk[i].clean_ids, T, NULL)) ||
            (st = lens_run(&v, m, &c, T - 1, tk[i].answer_id)))
            goto out;
        for (size_t r = 0; r < R; r++)
            ans[r] = (ncout_lens_answer){.prob = v.ans[r].prob, .logprob = v.ans[r].logprob,
                                         .reciprocal_rank = v.ans[r].reciprocal_rank, .rank = v.ans[r].rank};
        ncout_lens_view lv = {.n_rows = v.n_rows, .k = v.k, .answer = v.answer, .ans = ans, .top_id = v.top_id,
                              .top_prob = v.top_prob};
        if ((st = ncout_lens_put(&w, i, &lv, tok, tk[i].clean_ids, T, d->items[first + i].answer)))
            goto out;
    }
out:
    free(label), free(hook), free(label_p), free(hook_p), free(ans);
    lens_view_free(&v);
    forward_cache_free(&c);
    return st;
}

ps_status lens_dataset_write_tokens(const char *output, model *m, const tokenizer *tok, const dataset *d,
                                    size_t first, const dataset_tokens *tk, size_t n, bool bos, size_t top_k)
{
    ncout_file f = {.ncid = -1};
    ps_status st;
    if ((st = ncout_create(&f, output)) == PS_OK &&
        (st = write_prompts(&f, m, tok, d, first, tk, n, bos, top_k)) == PS_OK)
        st = ncout_commit(&f);
    else
        ncout_abort(&f);
    return st;
}

ps_status lens_dataset_write(const char *output, model *m, const tokenizer *tok, const char *path, size_t first,
                             size_t count, bool bos, size_t top_k, size_t *n_written)
{
    dataset d = {0};
    dataset_tokens *tk = NULL;
    ncout_file f = {.ncid = -1};
    size_t n_tok = 0, n = 0;
    ps_status st;
    *n_written = 0;
    if ((st = ncout_create(&f, output)) || (st = dataset_read_jsonl(&d, path)))
        goto out;
    if (first >= d.n) {
        st = err_set(PS_ERR_INVALID, "%s: no items from index %zu on", path, first);
        goto out;
    }
    n = count && first + count < d.n ? count : d.n - first;
    /* Tokenize (and validate) everything first: a bad item fails the run
     * before any compute, and the longest prompt sizes the file and cache. */
    if (!(tk = calloc(n, sizeof *tk))) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory for %zu items", path, n);
        goto out;
    }
    for (; n_tok < n; n_tok++)
        if ((st = dataset_tokenize(&d, first + n_tok, tok, bos, m->cfg.n_positions, &tk[n_tok])))
            goto out;
    if ((st = write_prompts(&f, m, tok, &d, first, tk, n, bos, top_k)) == PS_OK &&
        (st = ncout_commit(&f)) == PS_OK)
        *n_written = n;
out:
    if (st)
        ncout_abort(&f);
    for (size_t i = 0; i < n_tok; i++)
        dataset_tokens_free(&tk[i]);
    free(tk);
    dataset_free(&d);
    return st;
}
