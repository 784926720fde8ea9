"""Roles (issue 19 item 1): dataset items name spans of the clean prompt,
mapped to token positions; results files carry role, role_position, the
items' metadata (item_NAME) and V_by_role / _std / _count, also per
template; `plot --by-role`; the sweep summary aligned by role.
  - a mixed-template dataset (IOI templates of several lengths, capitals
    with 1-3 shots, and hand-written items using the text form): the
    role-aligned means, standard deviations and counts equal a by-hand
    computation in xarray from the per-prompt grids, overall and per
    template;
  - role positions: the token containing the span's first byte, END the
    last token; -1 for a role an item does not name;
  - metadata: strings and integers carried, arrays dropped;
  - merge of two slices recomputes the aggregates of the whole dataset;
  - bad roles refused with one line naming file:line."""
import json
import os
import subprocess
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
TMP = tempfile.mkdtemp(prefix="ps-roles-")


def run(args):
    return subprocess.run([BIN] + args, capture_output=True, text=True, cwd=TMP, timeout=600)


def job(name, dataset, output, components="resid_pre,attn_out,z"):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(f"[model]\ndir = model\n[data]\ndataset = {dataset}\n[patch]\ncomponents = {components}\n"
                f"[run]\noutput = {output}\n")
    return path


subprocess.run(["/usr/bin/python3", f"{ROOT}/tests/tools/make_model.py", "--layers", "3", "--heads", "4", "--d-model",
                "32", "--n-positions", "96", "--std", "0.3", "-o", os.path.join(TMP, "model")], check=True,
               capture_output=True)
run(["make-dataset", "ioi", "--n", "14", "--seed", "3", "-o", "ioi.jsonl"])
run(["make-dataset", "capitals", "--n", "6", "--seed", "4", "-o", "capitals.jsonl"])
ioi = [json.loads(x) for x in open(os.path.join(TMP, "ioi.jsonl"))]
cap = [json.loads(x) for x in open(os.path.join(TMP, "capitals.jsonl"))]
check("ioi items name IO, S1, S1+1, S2, END and a template",
      all(list(x["roles"]) == ["IO", "S1", "S1+1", "S2", "END"] and isinstance(x["template"], int) for x in ioi))
check("ioi spans are the names", all(x["clean"][x["roles"]["IO"][0]:x["roles"]["IO"][1]] == x["io"] and
                                     x["clean"][x["roles"]["S2"][0]:x["roles"]["S2"][1]] == x["s"] for x in ioi))
check("capitals items name COUNTRY, COUNTRY_LAST, END and a template",
      all(list(x["roles"]) == ["COUNTRY", "COUNTRY_LAST", "END"] and x["template"] == len(x["shots"]) for x in cap))
check("several ioi templates", len({x["template"] for x in ioi}) >= 4, sorted({x["template"] for x in ioi}))

# hand-written items: the text form with an occurrence, a role of their own
hand = [
    {"clean": "Mary and John went out. John gave a gift to", "corrupted": "Mary and John went out. Mary gave a gift to",
     "answer": " Mary", "wrong": " John", "template": 100, "source": "hand",
     "roles": {"IO": {"text": "Mary"}, "S2": {"text": " John", "occurrence": 2}, "GIFT": {"text": " gift"}}},
    {"clean": "Sam and Ann sat. Ann gave a pen to", "corrupted": "Sam and Ann sat. Sam gave a pen to",
     "answer": " Sam", "wrong": " Ann", "template": 100, "source": "hand", "roles": {"IO": [0, 3]}},
]
mixed = ioi[:8] + cap + hand + ioi[8:]
with open(os.path.join(TMP, "mixed.jsonl"), "w") as f:
    for x in mixed:
        f.write(json.dumps(x) + "\n")
lengths = set()

r = run(["sweep", job("mixed.ini", "mixed.jsonl", "mixed.nc")])
check("sweep of the mixed dataset", r.returncode == 0, r.stderr)
check("summary aligned by role", "@END" in r.stdout and "aligned by the dataset's roles" in r.stdout, r.stdout)
ds = xr.open_dataset(os.path.join(TMP, "mixed.nc"))
roles = [str(x) for x in ds["role"].values]
check("role coordinate: every name in first-appearance order",
      roles == ["IO", "S1", "S1+1", "S2", "END", "COUNTRY", "COUNTRY_LAST", "GIFT"], roles)
check("several lengths", len(set(int(x) for x in ds["length"].values)) >= 4, ds["length"].values)

# role positions against the tokenizer: the token containing the span's first byte
tok = subprocess.run([BIN, "tokenize", "--model", os.path.join(TMP, "model"), "--json", mixed[0]["clean"]],
                     capture_output=True, text=True)
toks = json.loads(tok.stdout)
strs = toks["tokens"][1:]  # after <|endoftext|>
rp = ds["role_position"].fillna(-1).astype(int).values
if strs:
    starts, at = [], 0
    for s in strs:
        starts.append(at)
        at += len(s.encode())
    want = []
    for name in roles:
        span = mixed[0]["roles"].get(name)
        if span is None:
            want.append(-1)
        else:
            want.append(1 + max(i for i, s in enumerate(starts) if s <= span[0]))
    check("role positions of item 0 from the tokens' byte offsets (BOS first)", list(rp[0]) == want, (list(rp[0]), want))
ends = [int(ds["length"].values[p]) - 1 for p in range(len(mixed))]
check("END is the last token of every prompt", list(rp[:, roles.index("END")]) == ends, (rp[:, 4], ends))
h0 = len(ioi[:8]) + len(cap)
clean0 = ds["clean_token"].values[h0]
check("text form: S2 is John's second occurrence", str(clean0[rp[h0, roles.index("S2")]]) == " John",
      clean0[rp[h0, roles.index("S2")]])
check("text form: GIFT", str(clean0[rp[h0, roles.index("GIFT")]]) == " gift", clean0)
check("absent roles are -1 (masked in xarray)", rp[h0 + 1, roles.index("S2")] == -1 and
      bool(np.isnan(ds["role_position"].values[h0 + 1, roles.index("S2")])))

# metadata
check("string metadata carried", list(ds["item_task"].values[:9]) == ["ioi"] * 8 + ["capitals"], ds["item_task"].values)
check("integer metadata carried as int64", ds["item_template"].dtype.kind in "if" and
      [int(x) for x in ds["item_template"].values] == [x["template"] for x in mixed])
check("a field some items lack is filled", ds["item_source"].values[h0] == "hand" and ds["item_source"].values[0] == "")
check("arrays are not carried", "item_shots" not in ds and "item_roles" not in ds)
check("template coordinate: the distinct ids, sorted",
      [int(x) for x in ds["template"].values] == sorted({x["template"] for x in mixed}))


def by_hand(grid, prompts):
    """mean, std (ddof 0), count over prompts at each role from the per-prompt grids"""
    L = ds.sizes["layer"]
    extra = grid.shape[3:]
    vals = [[[] for _ in roles] for _ in range(L)]
    mean = np.full((L, len(roles)) + extra, np.nan)
    std = np.full_like(mean, np.nan)
    cnt = np.zeros((L, len(roles)) + extra, dtype=int)
    done = ds["done"].values
    for r, name in enumerate(roles):
        for l in range(L):
            cells = []
            for p in prompts:
                pos = rp[p, r]
                if done[p] != 1 or pos < 0:
                    continue
                cells.append(grid[p, l, pos])
            if not cells:
                continue
            a = np.array(cells, dtype=np.float64)
            with np.errstate(invalid="ignore"):
                mean[l, r] = np.nanmean(a, axis=0) if np.isfinite(a).any() else np.nan
                std[l, r] = np.nanstd(a, axis=0) if np.isfinite(a).any() else np.nan
            cnt[l, r] = np.isfinite(a).sum(axis=0)
    return mean, std, cnt


allp = list(range(len(mixed)))
for var in ["resid_pre", "resid_pre_normalized", "attn_out_normalized", "z_normalized"]:
    grid = ds[var].values
    m, s, c = by_hand(grid, allp)
    got_m, got_s, got_c = ds[var + "_by_role"].values, ds[var + "_by_role_std"].values, ds[var + "_by_role_count"].values
    check(f"{var}_by_role = the by-hand mean over prompts", np.allclose(got_m, m, rtol=1e-6, atol=1e-6, equal_nan=True),
          np.nanmax(np.abs(got_m - m)))
    check(f"{var}_by_role_std = the by-hand std (ddof 0)", np.allclose(got_s, s, rtol=1e-5, atol=1e-6, equal_nan=True))
    check(f"{var}_by_role_count = the by-hand count", (got_c == c).all())
    ok = True
    for t, tid in enumerate(ds["template"].values):
        ps = [p for p in allp if int(ds["item_template"].values[p]) == int(tid)]
        m, s, c = by_hand(grid, ps)
        ok = ok and np.allclose(ds[var + "_by_role_template"].values[t], m, rtol=1e-6, atol=1e-6, equal_nan=True)
        ok = ok and (ds[var + "_by_role_template_count"].values[t] == c).all()
    check(f"{var}_by_role_template = the by-hand mean per template", ok)

# the user's analysis: select a role, group by template, mean over prompts
g = ds["resid_pre_normalized"]
at_s2 = g.isel(position=xr.DataArray(np.maximum(rp[:, roles.index("S2")], 0), dims="prompt"))
at_s2 = at_s2.where(ds["role_position"].sel(role="S2") >= 0)
per_t = at_s2.groupby(ds["item_template"]).mean("prompt")
tid = int(ioi[0]["template"])
check("xarray: group by template, select a role, mean = the file's per-template mean",
      np.allclose(per_t.sel(item_template=tid).values,
                  ds["resid_pre_normalized_by_role_template"].sel(template=tid, role="S2").values, equal_nan=True))

# plot --by-role
r = run(["plot", "mixed.nc", "-o", "roles.svg", "--by-role", "--var", "resid_pre_normalized,attn_out_normalized"])
svg = open(os.path.join(TMP, "roles.svg")).read() if r.returncode == 0 else ""
check("plot --by-role draws mean and spread panels with roles on x", r.returncode == 0 and "spread" in svg and
      "S1+1" in svg and "COUNTRY_LAST" in svg, r.stderr)
r = run(["plot", "mixed.nc", "-o", "x.svg", "--by-role", "--mean"])
check("plot --by-role --mean is a usage error", r.returncode == 2, r.stderr)

# merge of two slices: aggregates of the whole dataset
j = job("mixed.ini", "mixed.jsonl", "mixed.nc")
r1 = run(["sweep", j, "--slice", "1/2", "--output", "p1.nc"])
r2 = run(["sweep", j, "--slice", "2/2", "--output", "p2.nc"])
rm = run(["merge", "p2.nc", "p1.nc", "-o", "merged.nc"])
check("slices and merge", r1.returncode == 0 and r2.returncode == 0 and rm.returncode == 0,
      r1.stderr + r2.stderr + rm.stderr)
if rm.returncode == 0:
    mg = xr.open_dataset(os.path.join(TMP, "merged.nc"))
    ok = all(np.array_equal(mg[v].values, ds[v].values, equal_nan=True) for v in ds.data_vars if "_by_role" in v)
    check("merged aggregates equal the unsliced run's", ok)
    p1 = xr.open_dataset(os.path.join(TMP, "p1.nc"))
    check("a slice's aggregates cover its own prompts only",
          int(p1["resid_pre_by_role_count"].values.max()) < int(ds["resid_pre_by_role_count"].values.max()))

# bad roles: one line naming file:line
bad_cases = [
    ({"IO": [5, 2]}, "not a non-empty byte span"),
    ({"IO": [0, 999]}, "not a non-empty byte span"),
    ({"IO": {"text": "Zed"}}, "does not occur"),
    ({"IO": "Mary"}, "not [start, end]"),
    ({"I O": [0, 2]}, "role name"),
    ([1, 2], "not an object"),
]
for k, (roles_v, want) in enumerate(bad_cases):
    item = dict(hand[0], roles=roles_v)
    with open(os.path.join(TMP, f"bad{k}.jsonl"), "w") as f:
        f.write(json.dumps(hand[1]) + "\n" + json.dumps(item) + "\n")
    r = run(["sweep", job(f"bad{k}.ini", f"bad{k}.jsonl", f"bad{k}.nc")])
    lines = r.stderr.strip().splitlines()
    check(f"bad roles {json.dumps(roles_v)}: exit 1, one line naming bad{k}.jsonl:2",
          r.returncode == 1 and len(lines) >= 1 and f"bad{k}.jsonl:2" in lines[-1] and want in lines[-1] and
          not os.path.exists(os.path.join(TMP, f"bad{k}.nc")), r.stderr)

finish("roles")
