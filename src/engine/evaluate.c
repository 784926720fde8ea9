#include "evaluate.h"

#include <string.h>

#include "patch.h"

ps_status evaluate_dataset(const model *m, const tokenizer *tok, const dataset *d, bool bos, evaluate_result *r)
{
    memset(r, 0, sizeof *r);
    ps_status st = PS_OK;
    for (size_t i = 0; i < d->n && st == PS_OK; i++) {
        dataset_tokens tk;
        if ((st = dataset_tokenize(d, i, tok, bos, m->cfg.n_positions, &tk)))
            break;
        patch_pair p;
        st = patch_pair_init(&p, m, tk.clean_ids, tk.corrupted_ids, tk.n_tokens, tk.answer_id, tk.wrong_id);
        dataset_tokens_free(&tk);
        if (st)
            break;
        double c = p.clean_metric[PATCH_LOGIT_DIFF];
        r->sum_clean_logit_diff += c;
        r->sum_corrupted_logit_diff += p.corrupted_metric[PATCH_LOGIT_DIFF];
        r->correct += c > 0;
        /* top-1: no token strictly more likely than the answer (the pair
         * keeps the clean log-probabilities, not the logits) */
        const float la = p.clean_logprobs[p.answer];
        size_t greater = 0;
        for (size_t v = 0; v < m->cfg.vocab_size; v++)
            greater += p.clean_logprobs[v] > la;
        r->top1 += greater == 0;
        patch_pair_free(&p);
    }
    if (st)
        return st;
    if (d->n == 0)
        return err_set(PS_ERR_INVALID, "%s: no prompt pairs", d->path ? d->path : "dataset");
    r->n = d->n;
    const double n = (double)d->n;
    r->accuracy = r->correct / n;
    r->mean_clean_logit_diff = r->sum_clean_logit_diff / n;
    r->mean_corrupted_logit_diff = r->sum_corrupted_logit_diff / n;
    r->answer_top1 = r->top1 / n;
    return PS_OK;
}
