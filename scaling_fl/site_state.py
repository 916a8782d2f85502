"""Per-site tensors that survive between rounds (error-feedback residuals; later: control variates).

A worker that hosts many sites cannot keep a model-sized tensor per site on its device: 64 sites
of MiniLM with error feedback hold 64 x 91 MB. So each site's state lives where
`site_state_offload` says, and is checked out onto the device only while that site trains:

    cpu    in host memory (the default; on a CPU-only machine this is the device itself: no copy)
    disk   one safetensors file per site in the worker's temporary folder (only one site's state
           in memory at a time; costs a write and a read per site per round)
    device on the device, for a GPU with room to spare (no copies)

A site's state is created (zeros) the first time it trains, so sites that were never sampled cost
nothing, and it is untouched in the rounds the site sits out. Checkpoints save it per site (not per
process), so a checkpoint resumes in any packing.
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
        self._held: dict[int, dict[str, torch.Tensor]] = {}  # cpu / device: the tensors themselves
        self._on_disk: set[int] = set()
        self._workspace: dict[str, torch.Tensor] = {}  # the checked-out copy on the device (when it is not home)

    def sites(self) -> list[int]:
        return sorted(set(self._held) | self._on_disk)

    def checkout(
        self, site: int, shapes: dict[str, int], dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """The site's state on the device (zeros the first time); write it back with `checkin`."""
        stored = self._read(site)
        out = {}
        for name, numel in shapes.items():
            if name in stored and stored[name].numel() != numel:
                raise ValueError(f"site {site}: state {name!r} holds {stored[name].numel()} values, expected {numel}")
            if self.offload != "disk" and self.home == self.device:  # no copy: work on the stored tensor
                if name not in stored:
                    stored[name] = torch.zeros(numel, dtype=dtype, device=self.device)
                    self._held.setdefault(site, {})[name] = stored[name]
                out[name] = stored[name]
                continue
            buffer = self._workspace.get(name)
            if buffer is None or buffer.numel() != numel:
                buffer = self._workspace[name] = torch.empty(numel, dtype=dtype, device=self.device)
            buffer.copy_(stored[name]) if name in stored else buffer.zero_()
            out[name] = buffer
        return out

    def checkin(self, site: int, tensors: dict[str, torch.Tensor]) -> None:
        """Stores what `checkout` gave (after the site changed it)."""
        if not tensors:  # a configuration that keeps no per-site state
            return
        if self.offload == "disk":
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, self._path(site))
            self._on_disk.add(site)
            return
        held = self._held.setdefault(site, {})
        for name, tensor in tensors.items():
            if name in held and held[name] is tensor:
                continue
            if name in held:
                held[name].copy_(tensor)
            else:
                held[name] = tensor.detach().to(self.home, copy=True)

    def state_of(self, site: int) -> dict[str, torch.Tensor]:
        """The site's stored state (for a checkpoint): {} for a site that never trained."""
        return self._read(site)

    def load(self, site: int, tensors: dict[str, torch.Tensor]) -> None:
        """Restores a site's state from a checkpoint."""
        if self.offload == "disk":
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, self._path(site))
            self._on_disk.add(site)
        else:
            self._held[site] = {name: t.detach().to(self.home, copy=True) for name, t in tensors.items()}

    def nbytes(self) -> int:
        """Bytes held in memory (not on disk)."""
        return sum(t.nbytes for state in self._held.values() for t in state.values())

    def _read(self, site: int) -> dict[str, torch.Tensor]:
        if self.offload == "disk":
            return load_file(self._path(site)) if site in self._on_disk else {}
        return self._held.get(site, {})

    def _path(self, site: int) -> str:
        os.makedirs(self.directory, exist_ok=True)
        return os.path.join(self.directory, f"site-{site:05d}.safetensors")
