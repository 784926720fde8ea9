/*
 * dataset_gen: the IOI and capitals generators (dataset_gen.h), deterministic
 * by seed.
 */
#include "dataset_gen.h"
#include "dataset_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>



/* Fewer usable names than this and the IOI prompts would repeat the same few
 * pairs so often that a held-out split stops meaning anything. */
#define IOI_MIN_NAMES 20
/* A capitals item needs an asked country, a corrupting one and up to three
 * shot countries, all distinct; far more pairs keep the prompts varied. */
#define CAPITALS_MIN_PAIRS 20
#define CAPITALS_MAX_SHOTS 3

/* ------------------------------------------------------------------ PRNG */

/* xoshiro256** seeded by splitmix64 (Blackman & Vigna): libc rand() differs
 * between C libraries, and datasets must regenerate bit for bit anywhere. */
typedef struct {
    uint64_t s[4];
} ds_rng;

static uint64_t splitmix64_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void rng_seed(ds_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (size_t i = 0; i < 4; i++)
        r->s[i] = splitmix64_next(&x);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(ds_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Uniform in [0, n), n > 0.  Rejection instead of a bare modulo so small
 * lists are not biased toward their first entries. */
static size_t rng_below(ds_rng *r, size_t n)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % (uint64_t)n;
    uint64_t x;
    do
        x = rng_next(r);
    while (x >= limit);
    return (size_t)(x % (uint64_t)n);
}

/* ------------------------------------------------------------ word lists */

/* The IOI names of Wang et al. 2022 (their 100 most common US first names);
 * only those GPT-2 encodes as one token after a space are used. */
static const char *const ioi_names[] = {
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua",
    "Amanda", "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew",
    "Ryan", "Brandon", "Jason", "Justin", "Sarah", "William", "Jonathan",
    "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric",
    "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas",
    "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber",
    "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal",
    "Michelle", "Tiffany", "Jeremy", "Benjamin", "Mark", "Emily", "Aaron",
    "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean", "Erin", "Jamie",
    "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler",
    "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa",
    "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse",
    "Katie", "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia",
    "Cody", "Allison", "Bradley", "Samuel",
};

static const char *const ioi_places[] = {
    "store", "garden", "restaurant", "school", "hospital", "office", "house",
    "station", "park", "library", "beach", "market", "church", "airport",
    "museum", "bank", "cafe", "bakery", "theater", "zoo",
};

/* Objects start with a consonant so every template can say "a [OBJECT]". */
static const char *const ioi_objects[] = {
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink",
    "snack", "bottle of milk", "book", "letter", "present", "flower", "cake",
    "ticket", "hat", "bag", "key", "pen", "camera",
};

/* [N1] and [N2] are the two names of the first clause (ABBA: IO then S,
 * BABA: S then IO), [S2] the second mention of the subject; the prompt ends
 * right before the indirect object.  Templates 0-14 are Wang et al.'s BABA
 * templates (the seed worksheet's "After John and Mary went to the store,
 * Mary gave a bottle of milk to" is template 5), the rest add variety. */
static const char *const ioi_templates[] = {
    "Then, [N1] and [N2] went to the [PLACE]. [S2] gave a [OBJECT] to",
    "Then, [N1] and [N2] had a lot of fun at the [PLACE]. [S2] gave a [OBJECT] to",
    "Then, [N1] and [N2] were working at the [PLACE]. [S2] decided to give a [OBJECT] to",
    "Then, [N1] and [N2] were thinking about going to the [PLACE]. [S2] wanted to give a [OBJECT] to",
    "Then, [N1] and [N2] had a long argument, and afterwards [S2] said to",
    "After [N1] and [N2] went to the [PLACE], [S2] gave a [OBJECT] to",
    "When [N1] and [N2] got a [OBJECT] at the [PLACE], [S2] decided to give it to",
    "When [N1] and [N2] got a [OBJECT] at the [PLACE], [S2] decided to give the [OBJECT] to",
    "While [N1] and [N2] were working at the [PLACE], [S2] gave a [OBJECT] to",
    "While [N1] and [N2] were commuting to the [PLACE], [S2] gave a [OBJECT] to",
    "After the lunch, [N1] and [N2] went to the [PLACE]. [S2] gave a [OBJECT] to",
    "Afterwards, [N1] and [N2] went to the [PLACE]. [S2] gave a [OBJECT] to",
    "Then, [N1] and [N2] had a long argument. Afterwards [S2] said to",
    "The [PLACE] [N1] and [N2] went to had a [OBJECT]. [S2] gave it to",
    "Friends [N1] and [N2] found a [OBJECT] at the [PLACE]. [S2] gave it to",
    "Later, [N1] and [N2] met at the [PLACE]. [S2] handed a [OBJECT] to",
    "When [N1] and [N2] arrived at the [PLACE], [S2] showed a [OBJECT] to",
    "Yesterday, [N1] and [N2] went to the [PLACE], and [S2] brought a [OBJECT] to",
};

typedef struct {
    const char *country;
    const char *capital;
} capital_pair;

/* Only pairs whose capital is one GPT-2 token after a space are used; the
 * table is long so that enough survive and corruptions find same-length
 * countries. */
static const capital_pair capital_table[] = {
    {"France", "Paris"}, {"Poland", "Warsaw"}, {"Germany", "Berlin"},
    {"Italy", "Rome"}, {"Spain", "Madrid"}, {"England", "London"},
    {"Russia", "Moscow"}, {"Japan", "Tokyo"}, {"China", "Beijing"},
    {"Egypt", "Cairo"}, {"Greece", "Athens"}, {"Austria", "Vienna"},
    {"Ireland", "Dublin"}, {"Portugal", "Lisbon"}, {"Norway", "Oslo"},
    {"Sweden", "Stockholm"}, {"Finland", "Helsinki"}, {"Hungary", "Budapest"},
    {"Canada", "Ottawa"}, {"Australia", "Canberra"}, {"Thailand", "Bangkok"},
    {"Korea", "Seoul"}, {"Iran", "Tehran"}, {"Iraq", "Baghdad"},
    {"Afghanistan", "Kabul"}, {"Syria", "Damascus"}, {"Lebanon", "Beirut"},
    {"Kenya", "Nairobi"}, {"Cuba", "Havana"}, {"Peru", "Lima"},
    {"Chile", "Santiago"}, {"Venezuela", "Caracas"}, {"Indonesia", "Jakarta"},
    {"Vietnam", "Hanoi"}, {"Turkey", "Ankara"}, {"Belgium", "Brussels"},
    {"Denmark", "Copenhagen"}, {"Ukraine", "Kiev"}, {"Pakistan", "Islamabad"},
    {"Qatar", "Doha"}, {"Switzerland", "Bern"}, {"Romania", "Bucharest"},
    {"Bulgaria", "Sofia"}, {"Serbia", "Belgrade"}, {"Croatia", "Zagreb"},
    {"Iceland", "Reykjavik"}, {"Scotland", "Edinburgh"}, {"Wales", "Cardiff"},
    {"Israel", "Jerusalem"}, {"Jordan", "Amman"}, {"Nigeria", "Abuja"},
    {"Ghana", "Accra"}, {"Morocco", "Rabat"}, {"Algeria", "Algiers"},
    {"Tunisia", "Tunis"}, {"Libya", "Tripoli"}, {"Sudan", "Khartoum"},
    {"Uganda", "Kampala"}, {"Colombia", "Bogota"}, {"Ecuador", "Quito"},
    {"Uruguay", "Montevideo"}, {"Jamaica", "Kingston"}, {"Nepal", "Kathmandu"},
    {"Bangladesh", "Dhaka"}, {"Georgia", "Tbilisi"}, {"Armenia", "Yerevan"},
    {"Lithuania", "Vilnius"}, {"Latvia", "Riga"}, {"Estonia", "Tallinn"},
    {"Belarus", "Minsk"}, {"Slovakia", "Bratislava"}, {"Albania", "Tirana"},
    {"Cyprus", "Nicosia"}, {"Zimbabwe", "Harare"}, {"Senegal", "Dakar"},
    {"Somalia", "Mogadishu"}, {"Oman", "Muscat"}, {"Taiwan", "Taipei"},
    {"Brazil", "Brasilia"}, {"Zambia", "Lusaka"}, {"Mali", "Bamako"},
    {"Yemen", "Sanaa"}, {"Kazakhstan", "Astana"}, {"Mongolia", "Ulaanbaatar"},
};

/* More pairs for a tokenizer.json only (capital_entries): Llama 2's 32k
 * SentencePiece vocabulary keeps 16 of the capitals above as one token;
 * these (states and regions too) are one token there as well. */
static const capital_pair capital_table_more[] = {
    {"Netherlands", "Amsterdam"}, {"Texas", "Austin"}, {"Colorado", "Denver"},
    {"Arizona", "Phoenix"}, {"Massachusetts", "Boston"}, {"Virginia", "Richmond"},
    {"Wisconsin", "Madison"}, {"Nebraska", "Lincoln"}, {"Mississippi", "Jackson"},
    {"Catalonia", "Barcelona"}, {"Ontario", "Toronto"}, {"Tuscany", "Florence"},
    {"Lombardy", "Milan"}, {"Victoria", "Melbourne"},
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* --------------------------------------------------------------- helpers */

typedef struct {
    char *p;
    size_t len, cap;
} sbuf;

static bool sb_append(sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 128;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return false;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return true;
}

static bool sb_puts(sbuf *b, const char *s) { return sb_append(b, s, strlen(s)); }

typedef struct {
    const char *key;   /* "[N1]" */
    const char *value;
} slot;

/* Copy `tmpl` into b (emptied first) with every slot key replaced; at[k]
 * (when at is not NULL) gets the byte offset of slot k's first value, or
 * SIZE_MAX when the template lacks it (the roles of the items). */
static bool fill_template_at(sbuf *b, const char *tmpl, const slot *slots, size_t n_slots, size_t *at)
{
    if (at)
        for (size_t k = 0; k < n_slots; k++)
            at[k] = SIZE_MAX;
    b->len = 0;
    if (!sb_append(b, "", 0))
        return false;
    const char *p = tmpl;
    while (*p) {
        bool replaced = false;
        if (*p == '[') {
            for (size_t k = 0; k < n_slots; k++) {
                size_t kl = strlen(slots[k].key);
                if (strncmp(p, slots[k].key, kl) == 0) {
                    if (at && at[k] == SIZE_MAX)
                        at[k] = b->len;
                    if (!sb_puts(b, slots[k].value))
                        return false;
                    p += kl;
                    replaced = true;
                    break;
                }
            }
        }
        if (!replaced) {
            if (!sb_append(b, p, 1))
                return false;
            p++;
        }
    }
    return true;
}
static bool fill_template(sbuf *b, const char *tmpl, const slot *slots, size_t n_slots)
{
    return fill_template_at(b, tmpl, slots, n_slots, NULL);
}

/* [start, end) as a JSON array, the form of a role (dataset.h). */
static json_t *span_json(size_t start, size_t end)
{
    return json_pack("[I, I]", (json_int_t)start, (json_int_t)end);
}

/* ------------------------------------------------------------ generators */

/* Keep the entries of `words` that are one token after a space
 * (tokenizer_single_token: after a word, for a tokenizer.json). */
static ps_status single_token_words(const tokenizer *t, const char *const *words, size_t n,
                                    const char ***kept, size_t *n_kept)
{
    *kept = malloc(n * sizeof **kept);
    *n_kept = 0;
    if (!*kept)
        return err_set(PS_ERR_NOMEM, "dataset: cannot allocate a word list of %zu entries", n);
    sbuf b = {0};
    for (size_t i = 0; i < n; i++) {
        b.len = 0;
        if (!sb_puts(&b, " ") || !sb_puts(&b, words[i])) {
            free(b.p);
            free(*kept);
            *kept = NULL;
            return err_set(PS_ERR_NOMEM, "dataset: cannot allocate a word");
        }
        int32_t id;
        if (tokenizer_single_token(t, b.p, &id) == PS_OK)
            (*kept)[(*n_kept)++] = words[i];
    }
    free(b.p);
    err_clear();
    return PS_OK;
}

/* Check the generated pair before it is handed out: names and countries were
 * chosen to keep lengths equal, but BPE merges across a changed word would
 * silently break patching, so measure rather than assume. */
static ps_status check_equal_length(const tokenizer *t, const char *clean, const char *corrupted,
                                    const char *where)
{
    size_t a = 0, b = 0;
    ps_status st = dataset_count_tokens(t, clean, &a, where);
    if (st == PS_OK)
        st = dataset_count_tokens(t, corrupted, &b, where);
    if (st == PS_OK && a != b) {
        char q[256];
        dataset_quote_text(clean, q, sizeof q);
        st = err_set(PS_ERR_INTERNAL,
                     "%s: generated clean and corrupted prompts differ in token length (%zu vs %zu): '%s'",
                     where, a, b, q);
    }
    return st;
}

static ps_status check_n(size_t n, const char *what)
{
    if (n == 0)
        return err_set(PS_ERR_INVALID, "dataset: %s: the number of items must be at least 1", what);
    if (n > DATASET_MAX_ITEMS)
        return err_set(PS_ERR_NOMEM, "dataset: %s: %zu items asked, over the limit of %zu", what, n,
                       DATASET_MAX_ITEMS);
    return PS_OK;
}

/* k distinct indices below n (k <= n) into out, in draw order. */
static void pick_distinct(ds_rng *r, size_t n, size_t k, size_t *out)
{
    for (size_t i = 0; i < k; i++) {
        size_t x;
        bool dup;
        do {
            x = rng_below(r, n);
            dup = false;
            for (size_t j = 0; j < i; j++)
                dup |= out[j] == x;
        } while (dup);
        out[i] = x;
    }
}

ps_status dataset_make_ioi(dataset *d, const tokenizer *t, size_t n, uint64_t seed, ioi_corruption c)
{
    dataset_init(d);
    ps_status st = check_n(n, "ioi");
    if (st != PS_OK)
        return st;
    if (c != IOI_CORRUPT_S2 && c != IOI_CORRUPT_ABC)
        return err_set(PS_ERR_INVALID, "dataset: ioi: unknown corruption %d", (int)c);
    const char **names = NULL;
    size_t n_names = 0;
    st = single_token_words(t, ioi_names, COUNT(ioi_names), &names, &n_names);
    if (st != PS_OK)
        return st;
    if (n_names < IOI_MIN_NAMES) {
        free(names);
        return err_set(PS_ERR_INVALID,
                       "dataset: ioi: only %zu of %zu names are one token after a space, need %d "
                       "(is this the GPT-2 tokenizer?)",
                       n_names, COUNT(ioi_names), IOI_MIN_NAMES);
    }
    d->path = strdup(DATASET_GENERATED_PATH);
    if (!d->path) {
        free(names);
        return err_set(PS_ERR_NOMEM, "dataset: ioi: cannot allocate");
    }
    ds_rng r;
    rng_seed(&r, seed);
    /* Orders alternate from a random start so any two consecutive items
     * cover both; everything else is drawn per item. */
    bool abba = rng_below(&r, 2) == 0;
    sbuf clean = {0}, corrupted = {0};
    size_t cap = 0;
    char where[128];
    for (size_t i = 0; i < n && st == PS_OK; i++, abba = !abba) {
        snprintf(where, sizeof where, DATASET_GENERATED_PATH " ioi item %zu", i);
        size_t tmpl = rng_below(&r, COUNT(ioi_templates));
        const char *place = ioi_places[rng_below(&r, COUNT(ioi_places))];
        const char *object = ioi_objects[rng_below(&r, COUNT(ioi_objects))];
        /* Five names are drawn for every item whatever the corruption, so the
         * clean prompts of one seed are the same for s2 and abc. */
        size_t pick[5];
        pick_distinct(&r, n_names, 5, pick);
        const char *io = names[pick[0]], *s = names[pick[1]];
        slot sl[5] = {
            {"[N1]", abba ? io : s}, {"[N2]", abba ? s : io}, {"[S2]", s},
            {"[PLACE]", place}, {"[OBJECT]", object},
        };
        size_t at[5];
        if (!fill_template_at(&clean, ioi_templates[tmpl], sl, 5, at)) {
            st = err_set(PS_ERR_NOMEM, "%s: cannot allocate the prompt", where);
            break;
        }
        if (c == IOI_CORRUPT_S2) {
            sl[2].value = io;
        } else {
            sl[0].value = names[pick[2]];
            sl[1].value = names[pick[3]];
            sl[2].value = names[pick[4]];
        }
        if (!fill_template(&corrupted, ioi_templates[tmpl], sl, 5)) {
            st = err_set(PS_ERR_NOMEM, "%s: cannot allocate the prompt", where);
            break;
        }
        st = check_equal_length(t, clean.p, corrupted.p, where);
        if (st != PS_OK)
            break;
        char answer[64], wrong[64];
        snprintf(answer, sizeof answer, " %s", io);
        snprintf(wrong, sizeof wrong, " %s", s);
        /* roles: IO and S1 are [N1]/[N2] by order, S1+1 the token after S1 */
        size_t io_at = abba ? at[0] : at[1], s1_at = abba ? at[1] : at[0], len = strlen(clean.p);
        size_t s1_end = s1_at + strlen(s);
        json_t *roles = json_pack("{s:o, s:o, s:o, s:o, s:o}", "IO", span_json(io_at, io_at + strlen(io)), "S1",
                                  span_json(s1_at, s1_end), "S1+1", span_json(s1_end, s1_end + 1), "S2",
                                  span_json(at[2], at[2] + strlen(s)), "END", span_json(len - 1, len));
        json_t *obj = roles ? json_pack("{s:s, s:s, s:s, s:s, s:s, s:i, s:s, s:s, s:s, s:s, s:s, s:s, s:o}",
                                        "clean", clean.p, "corrupted", corrupted.p, "answer", answer,
                                        "wrong", wrong, "task", "ioi", "template", (json_int_t)tmpl,
                                        "order", abba ? "ABBA" : "BABA", "io", io, "s", s, "place", place,
                                        "object", object, "corruption",
                                        c == IOI_CORRUPT_S2 ? "s2" : "abc", "roles", roles)
                            : NULL;
        if (!obj) {
            st = err_set(PS_ERR_NOMEM, "%s: cannot build the JSON record", where);
            break;
        }
        st = dataset_push(d, &cap, obj, 0, where);
    }
    free(clean.p);
    free(corrupted.p);
    free(names);
    if (st != PS_OK)
        dataset_free(d);
    return st;
}

typedef struct {
    const capital_pair *pair;
    size_t country_tokens;   /* tokens of " Country" (a tokenizer.json: of its question) */
} capital_entry;

/* Usable pairs: capital one token after a space (tokenizer_single_token),
 * country length measured. */
static ps_status capital_entries(const tokenizer *t, capital_entry **out, size_t *n_out,
                                 size_t *n_tried)
{
    /* GPT-2's datasets draw from capital_table alone, as they always have
     * (the golden outputs pin them); a tokenizer.json also gets the top-up
     * table, since a 32k vocabulary keeps few of the first one's capitals. */
    size_t n_main = COUNT(capital_table);
    size_t n_all = n_main + (tokenizer_is_hf(t) ? COUNT(capital_table_more) : 0);
    *n_tried = n_all;
    *out = malloc(n_all * sizeof **out);
    *n_out = 0;
    if (!*out)
        return err_set(PS_ERR_NOMEM, "dataset: capitals: cannot allocate the table");
    char buf[128];
    for (size_t i = 0; i < n_all; i++) {
        const capital_pair *p = i < n_main ? &capital_table[i] : &capital_table_more[i - n_main];
        int32_t id;
        snprintf(buf, sizeof buf, " %s", p->capital);
        if (tokenizer_single_token(t, buf, &id) != PS_OK)
            continue;
        /* A tokenizer.json's normalizer may prepend "▁" to a text encoded
         * alone (Llama 2, Mistral), so its countries are measured in their
         * question, which is what the prompts compare. */
        if (tokenizer_is_hf(t))
            snprintf(buf, sizeof buf, "Q: What is the capital of %s?\nA:", p->country);
        else
            snprintf(buf, sizeof buf, " %s", p->country);
        size_t n = 0;
        ps_status st = dataset_count_tokens(t, buf, &n, "dataset: capitals");
        if (st != PS_OK) {
            free(*out);
            *out = NULL;
            return st;
        }
        (*out)[*n_out].pair = p;
        (*out)[*n_out].country_tokens = n;
        (*n_out)++;
    }
    err_clear();
    return PS_OK;
}

ps_status dataset_make_capitals(dataset *d, const tokenizer *t, size_t n, uint64_t seed)
{
    dataset_init(d);
    ps_status st = check_n(n, "capitals");
    if (st != PS_OK)
        return st;
    capital_entry *e = NULL;
    size_t n_e = 0, n_tried = 0;
    st = capital_entries(t, &e, &n_e, &n_tried);
    if (st != PS_OK)
        return st;
    /* Askable countries: those with another country of the same token length
     * to corrupt to; indices into e. */
    size_t *askable = malloc(n_e * sizeof *askable);
    size_t n_ask = 0;
    if (!askable) {
        free(e);
        return err_set(PS_ERR_NOMEM, "dataset: capitals: cannot allocate the table");
    }
    for (size_t i = 0; i < n_e; i++)
        for (size_t j = 0; j < n_e; j++)
            if (j != i && e[j].country_tokens == e[i].country_tokens) {
                askable[n_ask++] = i;
                break;
            }
    if (n_e < CAPITALS_MIN_PAIRS || n_ask < 2) {
        free(e);
        free(askable);
        return err_set(PS_ERR_INVALID,
                       "dataset: capitals: only %zu of %zu country/capital pairs have a one-token "
                       "capital, need %d (is this the GPT-2 tokenizer?)",
                       n_e, n_tried, CAPITALS_MIN_PAIRS);
    }
    d->path = strdup(DATASET_GENERATED_PATH);
    if (!d->path) {
        free(e);
        free(askable);
        return err_set(PS_ERR_NOMEM, "dataset: capitals: cannot allocate");
    }
    ds_rng r;
    rng_seed(&r, seed);
    sbuf clean = {0}, corrupted = {0}, shots = {0};
    size_t cap = 0;
    char where[128];
    for (size_t i = 0; i < n && st == PS_OK; i++) {
        snprintf(where, sizeof where, DATASET_GENERATED_PATH " capitals item %zu", i);
        size_t ask = askable[rng_below(&r, n_ask)];
        size_t alt;
        do
            alt = rng_below(&r, n_e);
        while (alt == ask || e[alt].country_tokens != e[ask].country_tokens);
        /* Shot countries differ from both asked countries, so neither the
         * answer nor the corrupted answer can be copied from the context. */
        size_t n_shots = 1 + rng_below(&r, CAPITALS_MAX_SHOTS);
        size_t shot_idx[CAPITALS_MAX_SHOTS];
        for (size_t k = 0; k < n_shots; k++) {
            size_t x;
            bool bad;
            do {
                x = rng_below(&r, n_e);
                bad = x == ask || x == alt;
                for (size_t j = 0; j < k; j++)
                    bad |= shot_idx[j] == x;
            } while (bad);
            shot_idx[k] = x;
        }
        json_t *shot_arr = json_array();
        bool ok = shot_arr != NULL;
        shots.len = 0;
        ok = ok && sb_puts(&shots, "");
        for (size_t k = 0; k < n_shots && ok; k++) {
            const capital_pair *p = e[shot_idx[k]].pair;
            ok = sb_puts(&shots, "Q: What is the capital of ") && sb_puts(&shots, p->country) &&
                 sb_puts(&shots, "?\nA: ") && sb_puts(&shots, p->capital) && sb_puts(&shots, "\n") &&
                 json_array_append_new(shot_arr, json_string(p->country)) == 0;
        }
        const capital_pair *pa = e[ask].pair, *pb = e[alt].pair;
        clean.len = corrupted.len = 0;
        ok = ok && sb_puts(&clean, shots.p) && sb_puts(&clean, "Q: What is the capital of ") &&
             sb_puts(&clean, pa->country) && sb_puts(&clean, "?\nA:");
        ok = ok && sb_puts(&corrupted, shots.p) &&
             sb_puts(&corrupted, "Q: What is the capital of ") && sb_puts(&corrupted, pb->country) &&
             sb_puts(&corrupted, "?\nA:");
        if (!ok) {
            json_decref(shot_arr);
            st = err_set(PS_ERR_NOMEM, "%s: cannot allocate the prompt", where);
            break;
        }
        st = check_equal_length(t, clean.p, corrupted.p, where);
        if (st != PS_OK) {
            json_decref(shot_arr);
            break;
        }
        char answer[64], wrong[64];
        snprintf(answer, sizeof answer, " %s", pa->capital);
        snprintf(wrong, sizeof wrong, " %s", pb->capital);
        /* roles: the asked country's first and last tokens (the spans start at
         * its first and last byte), END (the last byte's token); template: the number of shots */
        size_t c_at = shots.len + strlen("Q: What is the capital of "), c_end = c_at + strlen(pa->country);
        json_t *roles = json_pack("{s:o, s:o, s:o}", "COUNTRY", span_json(c_at, c_end), "COUNTRY_LAST",
                                  span_json(c_end - 1, c_end), "END",
                                  span_json(strlen(clean.p) - 1, strlen(clean.p)));
        json_t *obj = roles ? json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:i, s:o}", "clean", clean.p,
                                        "corrupted", corrupted.p, "answer", answer, "wrong", wrong, "task",
                                        "capitals", "country", pa->country, "capital", pa->capital,
                                        "corrupted_country", pb->country, "shots", shot_arr, "template",
                                        (json_int_t)n_shots, "roles", roles)
                            : NULL;
        if (!obj) {
            st = err_set(PS_ERR_NOMEM, "%s: cannot build the JSON record", where);
            break;
        }
        st = dataset_push(d, &cap, obj, 0, where);
    }
    free(clean.p);
    free(corrupted.p);
    free(shots.p);
    free(e);
    free(askable);
    if (st != PS_OK)
        dataset_free(d);
    return st;
}
