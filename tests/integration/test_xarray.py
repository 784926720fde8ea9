"""Results files in xarray (issue 19 item 2, schema 2): the user's analyses
need no extra code and give the right numbers; old files still read.
  - a sweep of a mixed-template IOI dataset on the embedded model: `prompt`
    is a coordinate (the dataset index), token strings and ids label
    positions (ids int32, -1 past a prompt's length), item_* label prompts,
    done / skipped are int8 with flag_values / flag_meanings, complete is an
    integer, no string variable has a _FillValue;
  - group by template, select a role, mean over prompts in xarray equal the
    numbers computed by hand from the per-prompt grids with netCDF4/numpy
    (and the file's own V_by_role[_template]);
  - a stopped sweep: length of the prompts not done is masked (the mean
    length is that of the done prompts), complete == 0;
  - the layer coordinate: block numbers in patching and lens files alike,
    the lens embedding row -1 with layer_label "embed";
  - a file written back by xarray's to_netcdf is read by plot, and parts
    written back are merged into the unsliced run's values;
  - schema 1 files (a committed fixture written by the previous format):
    resume, merge and plot still read them."""
import gzip
import os
import shutil
import subprocess
import tempfile

import netCDF4
import numpy as np
import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
FAULT_BIN = os.path.join(os.environ["PS_BUILD"], "tests", "patchsweep-faults")
TMP = tempfile.mkdtemp(prefix="ps-xarray-")
os.symlink(os.path.join(ROOT, "jobs", "ioi-tiny", "model"), os.path.join(TMP, "model"))


def run(args, binary=BIN, env=None):
    return subprocess.run([binary] + args, capture_output=True, text=True, cwd=TMP, timeout=600,
                          env=dict(os.environ, **(env or {})))


def job(name, output, extra=""):
    with open(os.path.join(TMP, name), "w") as f:
        f.write(f"[model]\ndir = model\n[data]\ndataset = ioi.jsonl\n[patch]\ncomponents = resid_pre,z_all_pos\n"
                f"[run]\noutput = {output}\n{extra}")
    return name


r = run(["make-dataset", "ioi", "--n", "16", "--seed", "3", "--model", "model", "-o", "ioi.jsonl"])
check("make-dataset", r.returncode == 0, r.stderr)
r = run(["sweep", job("all.ini", "all.nc")])
check("sweep", r.returncode == 0, r.stderr)
ALL = os.path.join(TMP, "all.nc")
ds = xr.open_dataset(ALL)
N, L = ds.sizes["prompt"], ds.sizes["layer"]

# ---- the encoding ---------------------------------------------------------------
check("patchsweep_schema = 2", int(ds.attrs.get("patchsweep_schema", 0)) == 2, ds.attrs.get("patchsweep_schema"))
check("prompt is the dataset index coordinate", "prompt" in ds.indexes and list(ds.prompt.values) == list(range(N))
      and ds.prompt.dtype.kind == "i" and "prompt_index" not in ds, ds.prompt.values)
coords = ["clean_token", "clean_token_id", "corrupted_token", "corrupted_token_id"]
check("token strings and ids label the positions of the grids",
      all(c in ds.resid_pre.coords for c in coords) and ds.resid_pre.clean_token.dims == ("prompt", "position"),
      list(ds.resid_pre.coords))
check("item_* label the prompts", "item_template" in ds.resid_pre.coords and "item_io" in ds.resid_pre.coords,
      list(ds.resid_pre.coords))
raw = netCDF4.Dataset(ALL)
raw.set_auto_mask(False)
lengths = raw["length"][:]
ids = ds.clean_token_id.values
check("token ids are int32, -1 past the prompt's length", ds.clean_token_id.dtype == np.int32
      and ds.answer_id.dtype == np.int32 and all((ids[p, lengths[p]:] == -1).all() and (ids[p, :lengths[p]] >= 0).all()
                                                 for p in range(N)), ids)
check("more than one length (padding exercised)", len(set(lengths)) > 1, lengths)
check("done / skipped: int8 0/1 with flag_values and flag_meanings",
      ds.done.dtype == np.int8 and list(ds.done.attrs.get("flag_values", [])) == [0, 1]
      and ds.done.attrs.get("flag_meanings") == "not_done done" and ds.skipped.dtype == np.int8
      and ds.skipped.attrs.get("flag_meanings") == "not_skipped skipped", ds.done.attrs)
check("complete is the integer 1", isinstance(ds.attrs["complete"], np.integer) and ds.attrs["complete"] == 1,
      repr(ds.attrs["complete"]))
check("no string variable has a _FillValue",
      not [v for v in raw.variables.values() if v.dtype == str and "_FillValue" in v.ncattrs()])
check("length has _FillValue -1", raw["length"].getncattr("_FillValue") == -1)
check("layer: block numbers with layer_label", list(ds.layer.values) == list(range(L))
      and list(ds.layer_label.values) == [str(x) for x in range(L)] and "block" in ds.layer.attrs["long_name"])

# ---- the user's analyses, against numpy on the raw grids ----------------------------
grid = raw["resid_pre_normalized"][:].astype(np.float64)          # (prompt, layer, position)
grid[grid > 1e30] = np.nan
rpos = raw["role_position"][:]                                    # (prompt, role)
roles = list(raw["role"][:])
tmpl = raw["item_template"][:]
done = raw["done"][:]
templates = sorted(set(tmpl[done == 1].tolist()))
check("several templates", len(templates) >= 3, templates)
# S2 and END: the roles whose values differ from 0 in this denoising sweep
for ROLE in ("S2", "END"):
    ri = roles.index(ROLE)
    at_role = np.array([grid[p, :, rpos[p, ri]] for p in range(N)])   # (prompt, layer)
    hand_t = {t: at_role[(tmpl == t) & (done == 1)].mean(axis=0) for t in templates}
    hand_all = at_role[done == 1].mean(axis=0)
    check(f"{ROLE}: the numbers are not trivial", np.abs(hand_all).max() > 0.1, hand_all)
    # xarray: select a role (vectorized indexing by the role's position), keep
    # the prompts done, group by template, mean over prompts
    pos = ds.role_position.sel(role=ROLE)
    sel = ds.resid_pre_normalized.isel(position=pos.astype(int)).where(ds.done == 1)
    by_t = sel.groupby("item_template").mean("prompt")
    check(f"groupby template, role {ROLE}, mean over prompts == by hand",
          all(np.allclose(by_t.sel(item_template=t).values, hand_t[t], rtol=1e-6, atol=1e-6) for t in templates),
          (by_t.values, hand_t))
    check(f"role {ROLE}, mean over prompts == by hand",
          np.allclose(sel.mean("prompt").values, hand_all, rtol=1e-6, atol=1e-6))
    agg = ds.resid_pre_normalized_by_role_template.sel(role=ROLE)
    check(f"{ROLE}: the file's V_by_role_template agrees",
          all(np.allclose(agg.sel(template=t).values, hand_t[t], rtol=1e-5, atol=1e-6) for t in templates))
    check(f"{ROLE}: the file's V_by_role agrees",
          np.allclose(ds.resid_pre_normalized_by_role.sel(role=ROLE).values, hand_all, rtol=1e-5, atol=1e-6))
check("sel(layer=..) and the token labels line up",
      str(ds.resid_pre.sel(prompt=0, layer=1).isel(position=int(pos[0])).clean_token.values)
      == raw["clean_token"][0, rpos[0, ri]])
raw.close()

# ---- a stopped sweep: masked length, complete == 0 ------------------------------------
if os.path.exists(FAULT_BIN):
    r = run(["sweep", job("stop.ini", "stop.nc", "chunk_prompts = 4\n")], binary=FAULT_BIN,
            env={"PS_FAULT": "journal_sync:3:term"})
    st = xr.open_dataset(os.path.join(TMP, "stop.nc")) if os.path.exists(os.path.join(TMP, "stop.nc")) else None
    check("stopped sweep: a file with some prompts done", st is not None and 0 < int(st.done.sum()) < N,
          r.stderr[-500:])
    if st is not None:
        d = st.done.values == 1
        check("stopped sweep: complete == 0 (falsy)", st.attrs["complete"] == 0 and not st.attrs["complete"],
              repr(st.attrs["complete"]))
        check("stopped sweep: length masked where not done, mean length right",
              bool(np.isnan(st.length.values[~d]).all()) and abs(float(st.length.mean()) - lengths[d].mean()) < 1e-9,
              (st.length.values, float(st.length.mean())))
        st.close()
else:
    check("the fault binary is built", False, FAULT_BIN)

# ---- lens and cache files ---------------------------------------------------------
r = run(["lens", "--model", "model", "--dataset", os.path.join(ROOT, "jobs", "ioi-tiny", "capitals.jsonl"),
         "--top-k", "3", "-o", "lens.nc"])
check("lens --dataset", r.returncode == 0, r.stderr)
ln = xr.open_dataset(os.path.join(TMP, "lens.nc"))
check("lens layer: -1 = embed, then block numbers",
      list(ln.layer.values) == list(range(-1, L)) and list(ln.layer_label.values) == ["embed"] + [str(x) for x in range(L)]
      and str(ln.hook.sel(layer=-1).values) == "blocks.0.hook_resid_pre"
      and str(ln.hook.sel(layer=2).values) == "blocks.2.hook_resid_post", (ln.layer.values, ln.hook.values))
lraw = netCDF4.Dataset(os.path.join(TMP, "lens.nc"))
lraw.set_auto_mask(False)
ll = lraw["length"][:]
check("lens token ids: int32 coordinates, -1 past the length", "token_id" in ln.prob.coords or "token_id" in ln.coords
      and ln.token_id.dtype == np.int32 and all((ln.token_id.values[p, ll[p]:] == -1).all() for p in range(len(ll))))
check("lens prepend_bos and done: integers", isinstance(ln.attrs["prepend_bos"], np.integer)
      and ln.done.dtype == np.int8 and ln.done.attrs.get("flag_meanings") == "not_done done")
lraw.close()
ln.to_netcdf(os.path.join(TMP, "lens-rt.nc"))
r = run(["plot", "lens-rt.nc", "-o", "lens-rt.svg"])
check("plot reads a lens file written back by xarray", r.returncode == 0, r.stderr)
r = run(["cache", "--model", "model", "--prompt", "The capital of France is", "-o", "cache.nc"])
cs = xr.open_dataset(os.path.join(TMP, "cache.nc"))
check("cache: token_id and token label positions", r.returncode == 0 and "token_id" in cs.coords
      and cs.token_id.dtype == np.int32 and "token" in cs.coords and isinstance(cs.attrs["prepend_bos"], np.integer),
      r.stderr + str(cs))

# ---- written back by to_netcdf: plot and merge read it -------------------------------------
ds.to_netcdf(os.path.join(TMP, "all-rt.nc"))
ds.close()
r = run(["plot", "all-rt.nc", "-o", "rt.svg"])
r0 = run(["plot", "all.nc", "-o", "orig.svg"])


def svg(name, nc):
    """The figure without its file names (title, command line, source)."""
    with open(os.path.join(TMP, name)) as f:
        return f.read().replace(nc, "NC").replace(name, "SVG")


check("plot reads a results file written back by xarray, same figure", r.returncode == 0 and r0.returncode == 0
      and svg("rt.svg", "all-rt.nc") == svg("orig.svg", "all.nc"), r.stderr)
for k in (1, 2):
    r = run(["sweep", "all.ini", "--slice", f"{k}/2", "--output", f"part{k}.nc"])
    with xr.open_dataset(os.path.join(TMP, f"part{k}.nc")) as p:
        p.to_netcdf(os.path.join(TMP, f"part{k}-rt.nc"))
for what, parts, out in (("parts written back by xarray", ["part1-rt.nc", "part2-rt.nc"], "merged-rt.nc"),
                         ("a part written back and one not", ["part1.nc", "part2-rt.nc"], "merged-mix.nc")):
    r = run(["merge"] + parts + ["-o", out])
    check(f"merge reads {what}", r.returncode == 0, r.stderr)
    if r.returncode == 0:
        # equals: values and coordinates (the coordinates attributes of the parts united)
        with xr.open_dataset(os.path.join(TMP, out)) as m, xr.open_dataset(ALL) as a:
            diff = [v for v in a.variables if not m[v].equals(a[v])]
            check(f"merged {what} == the unsliced run", not diff and m.attrs["complete"] == 1, diff)

# ---- schema 1 files (fixtures written by the format before schema 2) ---------------------
FX = os.path.join(ROOT, "tests", "integration", "fixtures", "schema-v1")
for f in ("old-v1.ini", "old2.jsonl", "old-v1-part1.nc.sha256", "old-v1-part2.nc.sha256"):
    shutil.copy(os.path.join(FX, f), TMP)
for k in (1, 2):
    with gzip.open(os.path.join(FX, f"old-v1-part{k}.nc.gz")) as src, open(os.path.join(TMP, f"old-v1-part{k}.nc"),
                                                                          "wb") as dst:
        shutil.copyfileobj(src, dst)
old = xr.open_dataset(os.path.join(TMP, "old-v1-part1.nc"))
check("schema 1 fixture: no patchsweep_schema, prompt_index, complete = \"true\"",
      "patchsweep_schema" not in old.attrs and "prompt_index" in old and old.attrs["complete"] == "true")
old.close()
r = run(["sweep", "old-v1.ini", "--slice", "1/2", "--output", "old-v1-part1.nc"])
check("schema 1: resume sees the complete result", r.returncode == 0 and "already the complete result" in r.stdout,
      r.stdout + r.stderr)
r = run(["merge", "old-v1-part2.nc", "old-v1-part1.nc", "-o", "old-merged.nc"])
check("schema 1: merge", r.returncode == 0, r.stderr)
if r.returncode == 0:
    with xr.open_dataset(os.path.join(TMP, "old-merged.nc")) as m:
        check("schema 1: the merged file stays schema 1", "patchsweep_schema" not in m.attrs
              and list(m.prompt_index.values) == [0, 1] and m.attrs["complete"] == "true"
              and int(m.done.sum()) == 2, m)
r = run(["plot", "old-v1-part1.nc", "-o", "old.svg"])
check("schema 1: plot", r.returncode == 0, r.stderr)

shutil.rmtree(TMP, ignore_errors=True)
finish("xarray")
