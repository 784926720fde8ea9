#!/usr/bin/python3
"""The worksheet (../shared/seed/, sheet 8.1) in Python through the patchsweep
package, on the embedded model: early decoding (logit lens), residual-stream
decomposition, and activation patching with its heatmap.

    make && python3 examples/worksheet.py [--model DIR] [--out DIR]

The package needs numpy and xarray, which `make deps` installs as Debian's
packages for /usr/bin/python3; a python3 without them (a pyenv or venv first
on PATH) hands the script to /usr/bin/python3.

Writes OUT/worksheet-patching.svg (default OUT: results/).
"""
import argparse
import os
import sys

try:
    import numpy as np
except ImportError:
    if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    raise

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))   # the source tree's package (an install has it on sys.path)
import patchsweep  # noqa: E402


def print_top(ds, k=5):
    """The worksheet's print_top: the top tokens of each decoded layer."""
    for layer in ds.layer.values:
        row = ds.sel(layer=layer)
        tops = " ".join(f"{t!r:12}" for t in row.topk_token.values[:k])
        extra = f"  p(answer) {float(row.prob):.6f}  rank {int(row['rank'])}" if "prob" in row else ""
        print(f"{layer:>16}  {tops}{extra}")


def rdbu(v):
    """The worksheet's diverging RdBu scale at v in [-1, 1] (0 white)."""
    v = max(-1.0, min(1.0, v))
    red, white, blue = np.array([178, 24, 43]), np.array([247, 247, 247]), np.array([33, 102, 172])
    c = white + (blue - white) * v if v >= 0 else white + (red - white) * -v
    return "#%02x%02x%02x" % tuple(int(round(x)) for x in c)


def heatmap_svg(grid, path, title):
    """A layer x position heatmap of a normalized grid, labels token_i, as SVG."""
    vals = grid.values
    labels = [str(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for x in grid.label.values]
    cw, ch, left, top = 46, 30, 60, 60
    w, h = left + cw * vals.shape[1] + 20, top + ch * vals.shape[0] + 110
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="20" font-size="13">{title}</text>']
    lim = float(np.nanmax(np.abs(vals))) or 1.0
    for i in range(vals.shape[0]):
        out.append(f'<text x="{left - 8}" y="{top + ch * i + ch / 2 + 4}" text-anchor="end">L{i}</text>')
        for j in range(vals.shape[1]):
            v = vals[i, j]
            out.append(f'<rect x="{left + cw * j}" y="{top + ch * i}" width="{cw}" height="{ch}" '
                       f'fill="{rdbu(v / lim)}"><title>{labels[j]} L{i}: {v:.4f}</title></rect>')
    for j, lab in enumerate(labels):
        x, y = left + cw * j + cw / 2, top + ch * vals.shape[0] + 8
        out.append(f'<text x="{x}" y="{y}" transform="rotate(60 {x} {y})">{lab}</text>')
    out.append(f'<text x="{left}" y="{h - 8}">Position (x), Layer (y); colour: normalized logit difference '
               f'(-{lim:.2f} red .. {lim:.2f} blue)</text></svg>')
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "jobs", "ioi-tiny", "model"))
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = patchsweep.load(args.model)
    print(model)

    # 8.1.1 Early decoding: every layer's residual stream through ln_f and W_U
    poland_text = "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"
    poland_ids = model.to_tokens(poland_text)
    print(f"\n== 8.1.1 logit lens: {poland_ids.shape[1]} tokens, decoding the last ({model.to_str_tokens(poland_ids)[-1]!r})")
    lens = model.lens(poland_ids, answer=" Warsaw", top_k=5)
    print_top(lens)

    # 8.1.2 Residual stream: subtract one MLP's update and decode again
    layer = 0
    print(f"\n== 8.1.2 block {layer}'s output as is and without its MLP update (blocks.{layer}.hook_mlp_out)")
    print_top(model.decompose(poland_ids, layer=layer, subtract="mlp_out", answer=" Warsaw", top_k=5))
    # the same by hand from the cache: resid_post - mlp_out is resid_mid
    _, cache = model.run_with_cache(poland_ids, names_filter=lambda n: n.startswith(f"blocks.{layer}."))
    diff = cache["resid_post", layer] - cache["mlp_out", layer] - cache["resid_mid", layer]
    print(f"   |resid_post - mlp_out - resid_mid| max {float(np.abs(diff).max()):.2e}")
    att = model.attribution(poland_ids, " Warsaw", " Paris")
    print("   direct logit attribution to logit[' Warsaw'] - logit[' Paris']:")
    for comp, v in zip(att.component.values, att.values):
        print(f"   {comp:>12} {v:10.4f}")
    print(f"   {'sum':>12} {float(att.sum()):10.4f}   (model: {att.attrs['total']:.4f})")

    # 8.1.3 Activation patching (IOI): the worksheet's hook loop, then the fast grid
    clean_prompt = "After John and Mary went to the store, Mary gave a bottle of milk to"
    corrupted_prompt = "After John and Mary went to the store, John gave a bottle of milk to"
    clean_tokens, corrupted_tokens = model.to_tokens(clean_prompt), model.to_tokens(corrupted_prompt)
    john, mary = model.to_single_token(" John"), model.to_single_token(" Mary")

    def logits_to_logit_diff(logits):
        return float(logits[0, -1, john] - logits[0, -1, mary])

    clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter="blocks.*.hook_resid_pre")
    clean_logit_diff = logits_to_logit_diff(clean_logits)
    corrupted_logit_diff = logits_to_logit_diff(model(corrupted_tokens))
    print(f"\n== 8.1.3 activation patching\nClean logit difference: {clean_logit_diff:.3f}\n"
          f"Corrupted logit difference: {corrupted_logit_diff:.3f}")

    def residual_stream_patching_hook(resid_pre, hook, position):
        resid_pre[:, position, :] = clean_cache[hook.name][:, position, :]

    n_pos = clean_tokens.shape[1]
    loop = np.zeros((model.cfg.n_layers, n_pos))
    for layer in range(model.cfg.n_layers):
        for position in range(n_pos):
            hook = (lambda p: lambda act, h: residual_stream_patching_hook(act, h, p))(position)
            patched = model.run_with_hooks(corrupted_tokens,
                                           fwd_hooks=[(patchsweep.get_act_name("resid_pre", layer), hook)])
            loop[layer, position] = ((logits_to_logit_diff(patched) - corrupted_logit_diff) /
                                     (clean_logit_diff - corrupted_logit_diff))
    grid = patchsweep.patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric="logit_diff",
                                                       answer=" John", wrong=" Mary", normalize=True)
    print(f"hook loop ({loop.size} forwards) vs the fast engine: max |difference| "
          f"{float(np.abs(loop - grid.values).max()):.2e}")
    print("resid_pre, normalized logit difference (rows: layer; columns: position):")
    print("     " + " ".join(f"{lab[:8]:>8}" for lab in grid.label.values))
    for i, row in enumerate(grid.values):
        print(f"L{i}   " + " ".join(f"{v:8.3f}" for v in row))
    heads = patchsweep.patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_tokens,
                                                                   answer=" John", wrong=" Mary", normalize=True)
    bl, bh = np.unravel_index(int(np.argmax(heads.values)), heads.shape)
    print(f"strongest head (z, every position): L{bl}.H{bh} {float(heads.values[bl, bh]):.3f}")
    svg = os.path.join(args.out, "worksheet-patching.svg")
    heatmap_svg(grid, svg, "Normalized Logit Difference After Patching Residual Stream on the IOI Task")
    print(f"heatmap: {svg}")


if __name__ == "__main__":
    main()
