"""Results files (patch -o, sweep, lens, cache) as xarray.Datasets, with
helpers under the `ps` accessor:

    ds = patchsweep.open("results/ioi-tiny.nc")
    ds.ps.components                 # the patched components in the file
    ds.ps.grid("resid_pre", prompt=0)            # normalized grid, position labelled "token_i"
    ds.ps.grid("resid_pre", normalized=False)    # raw values, every prompt
    ds.ps.mean("resid_pre")          # mean normalized grid over the prompts done
    ds.ps.token_labels(0)            # ["<|endoftext|>_0", "After_1", ...] (clean tokens)
    ds.ps.done                       # indices of the prompts done
    ds.ps.roles                      # ["IO", "S1", "S1+1", "S2", "END"] (datasets with roles)
    ds.ps.at_roles("resid_pre")      # per-prompt grid read at each prompt's role positions
    ds.ps.by_role("resid_pre")       # the file's role-aligned mean, std and count (layer, role)
    ds.ps.by_role("resid_pre", per_template=True)   # the same per template
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

    # ---- role-aligned views (datasets whose items name roles: README, Roles)

    @property
    def roles(self):
        """The file's role names (END always last), or [] for a file without roles."""
        return [str(r) for r in self._ds["role"].values] if "role" in self._ds else []

    def _require_roles(self):
        if "role_position" not in self._ds:
            raise KeyError("the file has no roles (a dataset whose items name roles, or an older file)")

    def at_roles(self, component, normalized=True):
        """A (prompt, layer, position[, head]) grid read at each prompt's own
        role positions: (prompt, layer, role[, head]), NaN where a prompt lacks
        the role.  The per-prompt values behind by_role, for any grouping."""
        self._require_roles()
        g = self.grid(component, normalized=normalized)
        if "position" not in g.dims:
            raise KeyError(f"{component!r} has no position dimension: nothing to align by role")
        pos = self._ds["role_position"]
        valid = pos >= 0
        out = g.isel(position=pos.where(valid, 0).astype(int))
        return out.where(valid).assign_coords(role=self._ds["role"].values)

    def by_role(self, component, normalized=True, per_template=False):
        """The role-aligned statistics the writer stored: a Dataset of mean,
        std and count over the done prompts, (layer, role) or per template
        (template, layer, role)."""
        self._require_roles()
        base = component + ("_normalized" if normalized else "")
        stem = base + ("_by_role_template" if per_template else "_by_role")
        if stem not in self._ds:
            raise KeyError(f"{stem!r}: not in the file")
        return xr.Dataset({"mean": self._ds[stem], "std": self._ds[stem + "_std"],
                           "count": self._ds[stem + "_count"]})
