"""Results files (patch -o, sweep, lens, cache) as xarray.Datasets, with
helpers under the `ps` accessor:

    ds = patchsweep.open("results/ioi-tiny.nc")
    ds.ps.components                 # the patched components in the file
    ds.ps.grid("resid_pre", prompt=0)            # normalized grid, position labelled "token_i"
    ds.ps.grid("resid_pre", normalized=False)    # raw values, every prompt
    ds.ps.mean("resid_pre")          # mean normalized grid over the prompts done
    ds.ps.token_labels(0)            # ["<|endoftext|>_0", "After_1", ...] (clean tokens)
    ds.ps.done                       # indices of the prompts done
"""
import numpy as np
import xarray as xr


def open(path, **kwargs):  # noqa: A001
    return xr.open_dataset(path, **kwargs)


@xr.register_dataset_accessor("ps")
class PatchsweepAccessor:
    def __init__(self, ds):
        self._ds = ds

    @property
    def components(self):
        """Patching components of the file, in file order."""
        return [v[:-len("_normalized")] for v in self._ds.data_vars if v.endswith("_normalized")]

    @property
    def done(self):
        if "done" not in self._ds:
            return np.arange(self._ds.sizes.get("prompt", 0))
        return np.flatnonzero(self._ds["done"].values == 1)

    def token_labels(self, prompt=0, which="clean"):
        """The worksheet's x labels "token_i" of one prompt (its own length)."""
        ds = self._ds
        toks = ds[f"{which}_token"].isel(prompt=prompt).values
        n = int(ds["length"].isel(prompt=prompt)) if "length" in ds else len(toks)
        return [f"{t}_{i}" for i, t in enumerate(toks[:n])]

    def grid(self, component, prompt=None, normalized=True):
        """A component's grid (normalized by default); one prompt has its
        positions cut to its length and labelled with its clean tokens."""
        name = component + ("_normalized" if normalized else "")
        if name not in self._ds:
            raise KeyError(f"{name!r}: not in the file (components: {', '.join(self.components)})")
        g = self._ds[name]
        if prompt is None:
            return g
        g = g.isel(prompt=prompt)
        if "position" in g.dims:
            labels = self.token_labels(prompt)
            g = g.isel(position=slice(0, len(labels))).assign_coords(label=("position", labels))
        return g

    def mean(self, component, normalized=True):
        """Mean over the prompts done (NaN positions of shorter prompts skipped)."""
        return self.grid(component, normalized=normalized).isel(prompt=self.done).mean("prompt", skipna=True)
