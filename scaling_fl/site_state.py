"""Per-site tensors that survive between rounds: error-feedback residuals, and the local model of a
site between synchronizations (sync=periodic / dynamic); later: control variates.

A worker that hosts many sites cannot keep a model-sized tensor per site on its device: 64 sites
of MiniLM with error feedback hold 64 x 91 MB. So each site's state lives where
`site_state_offload` says, and is on the device only while that site trains:

    cpu    in host memory (the default; on a CPU-only machine this is the device itself: no copy)
    disk   one safetensors file per site and tensor in the worker's temporary folder (one site's
           state in memory at a time; costs a write and a read per site per round)
    device on the device, for a GPU with room to spare (no copies)

A residual is created (zeros) the first time its site trains, so sites that were never sampled
cost nothing, and it is untouched in the rounds the site sits out. Checkpoints save the state per
site (not per process), so a checkpoint resumes in any packing.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

OFFLOADS = ("cpu", "disk", "device")


class SiteStates:
    def __init__(self, offload: str, device: torch.device, directory: str | None = None):
        if offload not in OFFLOADS:
            raise ValueError(f"site_state_offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
        if offload == "disk" and not directory:
            raise ValueError("site_state_offload='disk' needs a directory")
        self.offload, self.device, self.directory = offload, torch.device(device), directory
        self.home = self.device if offload == "device" else torch.device("cpu")
        self.in_place = offload != "disk" and self.home == self.device  # checkout hands out the stored tensor
        self._held: dict[int, dict[str, torch.Tensor]] = {}  # cpu / device
        self._on_disk: dict[int, set[str]] = {}
        self._workspace: dict[str, torch.Tensor] = {}  # checked-out copies on the device

    def sites(self) -> list[int]:
        return sorted(site for site in set(self._held) | set(self._on_disk) if self.names(site))

    def names(self, site: int) -> list[str]:
        return sorted(set(self._held.get(site, {})) | self._on_disk.get(site, set()))

    # --- state a site updates in place every round it trains (residuals) -------------------------

    def checkout(
        self, site: int, shapes: dict[str, int], dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """The site's tensors `shapes` on the device (zeros the first time); store them with `checkin`."""
        out = {}
        for name, numel in shapes.items():
            stored = self._get(site, name)
            if stored is not None and stored.numel() != numel:
                raise ValueError(f"site {site}: state {name!r} holds {stored.numel()} values, expected {numel}")
            if self.in_place:
                if stored is None:
                    stored = self._held.setdefault(site, {})[name] = torch.zeros(numel, dtype=dtype, device=self.device)
                out[name] = stored
                continue
            buffer = self._workspace.get(name)
            if buffer is None or buffer.numel() != numel:
                buffer = self._workspace[name] = torch.empty(numel, dtype=dtype, device=self.device)
            buffer.copy_(stored) if stored is not None else buffer.zero_()
            out[name] = buffer
        return out

    def checkin(self, site: int, tensors: dict[str, torch.Tensor]) -> None:
        """Stores what `checkout` gave, after the site changed it."""
        for name, tensor in tensors.items():
            if not (self.in_place and self._held.get(site, {}).get(name) is tensor):
                self.keep(site, name, tensor)

    # --- state a site leaves and takes back (its local model between synchronizations) ----------

    def keep(self, site: int, name: str, tensor: torch.Tensor) -> None:
        """Stores a copy of `tensor` as the site's `name`."""
        if self.offload == "disk":
            save_file({name: tensor.detach().cpu().contiguous()}, self._path(site, name))
            self._on_disk.setdefault(site, set()).add(name)
            return
        held = self._held.setdefault(site, {})
        if name in held and held[name].shape == tensor.shape:
            held[name].copy_(tensor)
        else:
            held[name] = tensor.detach().to(self.home, copy=True)

    def take(self, site: int, name: str) -> torch.Tensor | None:
        """The site's `name` (None if it has none), removed from the store."""
        stored = self._get(site, name)
        if self.offload == "disk":
            if stored is not None:
                os.remove(self._path(site, name))
                self._on_disk[site].discard(name)
        else:
            self._held.get(site, {}).pop(name, None)
        return stored

    # --- checkpoints --------------------------------------------------------------------------

    def state_of(self, site: int) -> dict[str, torch.Tensor]:
        """Everything the site holds ({} for a site that never trained)."""
        return {name: self._get(site, name) for name in self.names(site)}

    def load(self, site: int, tensors: dict[str, torch.Tensor]) -> None:
        """Restores a site's state from a checkpoint."""
        for name, tensor in tensors.items():
            self.keep(site, name, tensor)

    def nbytes(self) -> int:
        """Bytes held in memory (not on disk)."""
        return sum(t.nbytes for state in self._held.values() for t in state.values())

    def _get(self, site: int, name: str) -> torch.Tensor | None:
        if self.offload == "disk":
            return load_file(self._path(site, name))[name] if name in self._on_disk.get(site, ()) else None
        return self._held.get(site, {}).get(name)

    def _path(self, site: int, name: str) -> str:
        os.makedirs(self.directory, exist_ok=True)
        return os.path.join(self.directory, f"site-{site:05d}.{name}.safetensors")
