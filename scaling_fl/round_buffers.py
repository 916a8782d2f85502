"""The worker's round buffers (the round's global model, the sums of its sites' updates) away from
the process while a site trains: `round_buffers_offload`.

A worker that trains its sites one after another reads those buffers only between two sites (to
start the next site from the global model, to add the finished site's update), never during local
training, which is when memory peaks: weights, gradients, the optimizer's moments and the
activations are all alive then. Each buffer is model-sized (87 MiB for MiniLM, 28 GB for a 7B model
in fp32), so moving them out for that time lowers the peak by two models:

    none   they stay where they are (the default)
    cpu    copied to host memory; on a worker whose device is the CPU this is `none`
    disk   written to a file in the job's temporary folder and read back (on the CPU, the pages
           then sit in the OS page cache, which the kernel can reclaim by writing them out, rather
           than in the process's own memory)

The tensors keep their identity: only their storage is emptied (`UntypedStorage.resize_(0)`) and
refilled, so every reference to them (the strategy's, the exchange's) stays valid.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

ROUND_BUFFER_OFFLOADS = ("none", "cpu", "disk")


class RoundBuffers:
    def __init__(self, offload: str, device: torch.device, directory: str | None = None):
        if offload not in ROUND_BUFFER_OFFLOADS:
            raise ValueError(
                f"round_buffers_offload must be one of {', '.join(ROUND_BUFFER_OFFLOADS)}, got {offload!r}"
            )
        if offload == "disk" and not directory:
            raise ValueError("round_buffers_offload='disk' needs a directory")
        device = torch.device(device)
        self.offload = "none" if offload == "cpu" and device.type == "cpu" else offload
        self.directory = directory

    @contextmanager
    def away(self, tensors: Sequence[torch.Tensor | None]) -> Iterator[None]:
        """Within the block the tensors hold no memory (reading them is an error); after it they hold
        exactly what they held before. Tensors that share a storage are moved once."""
        if self.offload == "none":
            yield
            return
        unique: dict[int, torch.Tensor] = {}
        for tensor in tensors:
            on_host_already = self.offload == "cpu" and tensor is not None and tensor.device.type == "cpu"
            if tensor is not None and tensor.numel() > 0 and not on_host_already:
                unique.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        moved = [(tensor, self._move_out(index, tensor)) for index, tensor in enumerate(unique.values())]
        try:
            yield
        finally:
            for tensor, where in moved:
                self._move_in(tensor, where)

    def _move_out(self, index: int, tensor: torch.Tensor) -> torch.Tensor | str:
        if (
            not tensor.is_contiguous()
            or tensor.storage_offset() != 0
            or tensor.untyped_storage().nbytes() != (tensor.numel() * tensor.element_size())
        ):
            raise ValueError("round_buffers_offload moves whole flat buffers only")
        if self.offload == "cpu":
            kept: torch.Tensor | str = tensor.to("cpu", copy=True)
        else:
            os.makedirs(self.directory, exist_ok=True)
            kept = os.path.join(self.directory, f"buffer-{index}.bin")
            host = tensor if tensor.device.type == "cpu" else tensor.cpu()
            with open(kept, "wb") as handle:
                handle.write(_raw_bytes(host))
            del host
        tensor.untyped_storage().resize_(0)
        return kept

    @staticmethod
    def _move_in(tensor: torch.Tensor, kept: torch.Tensor | str) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        tensor.untyped_storage().resize_(nbytes)
        if isinstance(kept, torch.Tensor):
            tensor.copy_(kept)
            return
        host = tensor if tensor.device.type == "cpu" else torch.empty(tensor.shape, dtype=tensor.dtype)
        with open(kept, "rb") as handle:
            read = handle.readinto(_raw_bytes(host))
        if read != nbytes:
            raise OSError(f"round buffer file {kept} holds {read} bytes, expected {nbytes}")
        if host is not tensor:
            tensor.copy_(host)
        os.remove(kept)


def _raw_bytes(tensor: torch.Tensor):
    """The bytes of a contiguous host tensor as a writable buffer, without a copy. Not through
    `.numpy()`: a storage that numpy has seen can no longer be resized."""
    return (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
