"""The package from `make install`'s prefix, and results files through patchsweep.open."""
import os
import subprocess
import sys

import numpy as np

from conftest import BIN, CLEAN, CORRUPTED, EMBEDDED, ROOT, close


def test_runs_from_the_install_prefix(tmp_path):
    dest = tmp_path / "dest"
    san = ["SANITIZE=1"] if os.path.basename(os.environ.get("PS_BUILD", "rel")) == "san" else []
    subprocess.run(["make", "-s", "-C", ROOT, "install", *san, "PREFIX=/usr/local", f"DESTDIR={dest}"],
                   check=True, capture_output=True)
    prefix = dest / "usr" / "local"
    sites = list((prefix / "lib").glob("python3*/dist-packages"))
    assert len(sites) == 1 and (sites[0] / "patchsweep" / "__init__.py").exists()
    assert os.readlink(prefix / "lib" / "libpatchsweep.so.0").startswith("libpatchsweep.so.0.")
    prog = (
        "import patchsweep, sys\n"
        f"m = patchsweep.load({EMBEDDED!r})\n"
        f"g = patchsweep.patching.get_act_patch_resid_pre(m, {CORRUPTED!r}, {CLEAN!r}, answer=' John', wrong=' Mary')\n"
        "print(patchsweep.__file__)\n"
        "print([l.split()[-1] for l in open('/proc/self/maps') if 'libpatchsweep' in l][0])\n"
        "print(round(float(g.attrs['clean_metric']), 4), m.to_str_tokens('Hi'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PATCHSWEEP_LIB", "PATCHSWEEP_TOKENIZER")}
    env["PYTHONPATH"] = str(sites[0])
    out = subprocess.run([sys.executable, "-c", prog], env=env, cwd=str(tmp_path), check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].startswith(str(sites[0])), out
    assert out[1].startswith(str(prefix / "lib")), out       # the installed .so, not the build tree's
    assert out[2] == "12.3923 ['<|endoftext|>', 'Hi']", out  # the tokenizer from PREFIX/share


def test_open_results(ps, model, tmp_path):
    out = tmp_path / "ioi.nc"
    subprocess.run([BIN, "patch", "--model", EMBEDDED, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer",
                    " John", "--wrong", " Mary", "--components", "resid_pre,z_all_pos", "-o", str(out)],
                   check=True, capture_output=True)
    ds = ps.open(out)
    assert ds.ps.components == ["resid_pre", "z_all_pos"]
    assert ds.ps.token_labels(0)[10] == " Mary_10"
    g = ds.ps.grid("resid_pre", prompt=0)
    assert g.dims == ("layer", "position") and g.label.values[0] == "<|endoftext|>_0"
    mine = ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary",
                                               normalize=True)
    assert np.allclose(g.values, mine.values, atol=1e-6)
    assert np.allclose(ds.ps.mean("z_all_pos").values,
                       ps.patching.get_act_patch_attn_head_out_all_pos(model, CORRUPTED, CLEAN, answer=" John",
                                                                       wrong=" Mary", normalize=True).values,
                       atol=1e-6)
    ds.close()


def test_worksheet_example(tmp_path):
    """examples/worksheet.py runs, its hook loop equals the fast engine, and the heatmap is valid SVG."""
    import xml.etree.ElementTree as ET
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "worksheet.py"), "--out", str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout
    assert "Clean logit difference: 12.392" in out and "strongest head (z, every position): L0.H3" in out
    diff = float(out.split("max |difference| ")[1].split()[0])
    assert diff < 1e-5
    root = ET.parse(tmp_path / "worksheet-patching.svg").getroot()
    assert len([e for e in root if e.tag.endswith("rect")]) == 4 * 17


def test_role_aligned_helpers(ps, tmp_path):
    """A sweep of the embedded model on 12 IOI pairs with roles: the file's
    role-aligned means equal the mean of the per-prompt grids read at each
    prompt's role positions (at_roles), and so do the counts."""
    data = tmp_path / "ioi.jsonl"
    cli_bin = BIN
    subprocess.run([cli_bin, "make-dataset", "ioi", "--n", "12", "--seed", "77", "-o", str(data)], check=True,
                   capture_output=True)
    job = tmp_path / "job.ini"
    job.write_text(f"[model]\ndir = {EMBEDDED}\n[data]\ndataset = {data}\n[patch]\ncomponents = resid_pre,z\n"
                   f"[run]\noutput = {tmp_path / 'r.nc'}\n")
    subprocess.run([cli_bin, "sweep", str(job)], check=True, capture_output=True)
    ds = ps.open(str(tmp_path / "r.nc"))
    assert ds.ps.roles == ["IO", "S1", "S1+1", "S2", "END"]
    at = ds.ps.at_roles("resid_pre")
    assert at.dims == ("prompt", "layer", "role")
    stats = ds.ps.by_role("resid_pre")
    close(stats["mean"].values, at.isel(prompt=ds.ps.done).mean("prompt").values)
    assert (stats["count"].values == at.isel(prompt=ds.ps.done).count("prompt").values).all()
    z = ds.ps.at_roles("z")
    assert z.dims[:3] == ("prompt", "layer", "role")
    tmpl = ds.ps.by_role("resid_pre", per_template=True)
    assert tmpl["mean"].dims == ("template", "layer", "role")
    ds.close()
