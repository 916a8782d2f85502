"""The model's trained state as one contiguous vector.

Every trained tensor becomes a view into one flat tensor, so an update is `local - global`
on two vectors and a bucket is a slice: no per-tensor loops, copies or collectives during
aggregation. The trained state is every float parameter and float buffer when the whole
model trains (a full fine-tune), and only the trainable parameters when part of it is
frozen (LoRA adapters on a frozen base): the frozen rest stays where it is, in its own
dtype (bf16 or fp16 for a half-precision base), and never crosses the wire. Integer
buffers (position ids, token type ids) are never averaged.
"""

from __future__ import annotations

import hashlib

import torch


def _float_tensors(model: torch.nn.Module):
    """Yields (module, name, tensor, is_parameter) once per distinct float tensor, in a fixed order."""
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param is not None and param.is_floating_point() and id(param) not in seen:
                seen.add(id(param))
                yield module, name, param, True
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and id(buf) not in seen:
                seen.add(id(buf))
                yield module, name, buf, False


def _trained_tensors(model: torch.nn.Module):
    """The entries of _float_tensors that form the trained state (see the module's docstring)."""
    entries = list(_float_tensors(model))
    if all(tensor.requires_grad for _, _, tensor, is_parameter in entries if is_parameter):
        return entries
    return [entry for entry in entries if entry[3] and entry[2].requires_grad]


def trained_names(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(qualified name, numel) of every tensor of the flat vector, in its order: what a checkpoint holds."""
    prefix = {id(module): name for name, module in model.named_modules()}
    return [
        (f"{prefix[id(module)]}.{name}".lstrip("."), tensor.numel())
        for module, name, tensor, _ in _trained_tensors(model)
    ]


def flatten_model_(model: torch.nn.Module) -> torch.Tensor:
    """Re-homes the model's trained state into one vector and returns it (shared storage).

    Call it after the model is on its device; moving the model later breaks the views.
    """
    entries = _trained_tensors(model)
    dtypes = {tensor.dtype for _, _, tensor, _ in entries}
    if len(dtypes) != 1:
        raise ValueError(f"model has mixed float dtypes {sorted(map(str, dtypes))}; keep master weights in one dtype")
    first = entries[0][2]
    flat = torch.empty(sum(t.numel() for _, _, t, _ in entries), dtype=first.dtype, device=first.device)
    offset = 0
    for module, name, tensor, is_parameter in entries:
        view = flat[offset : offset + tensor.numel()].view_as(tensor)
        view.copy_(tensor.detach())
        if is_parameter:
            tensor.data = view
        else:
            module._buffers[name] = view
        offset += tensor.numel()
    return flat


def views_of_parameters(model: torch.nn.Module, flat: torch.Tensor) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its slice of `flat`) for every trainable float parameter, `flat` laid out as
    flatten_model_ lays out the model's state: how a flat per-model tensor (a SCAFFOLD correction)
    meets the parameters' gradients."""
    views, offset = [], 0
    for _, _, tensor, is_parameter in _trained_tensors(model):
        if is_parameter and tensor.requires_grad:
            views.append((tensor, flat[offset : offset + tensor.numel()].view_as(tensor)))
        offset += tensor.numel()
    if offset != flat.numel():
        raise ValueError(f"a flat tensor of {flat.numel()} values does not match the model's {offset}")
    return views


def unflatten_model_(model: torch.nn.Module) -> None:
    """Gives every trained tensor its own storage again (for save_pretrained, which treats tensors that
    share a storage as tied weights)."""
    for module, name, tensor, is_parameter in _trained_tensors(model):
        if is_parameter:
            tensor.data = tensor.detach().clone()
        else:
            module._buffers[name] = tensor.clone()


def flat_sha256(flat: torch.Tensor) -> str:
    """A fingerprint of the exact bits, to check that all sites hold the same model."""
    return hashlib.sha256(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def swap_(a: torch.Tensor, b: torch.Tensor, chunk_numel: int = 1 << 22) -> None:
    """Exchanges the contents of two flat vectors through one chunk-sized temporary (exact bits)."""
    for start in range(0, a.numel(), chunk_numel):
        left, right = a[start : start + chunk_numel], b[start : start + chunk_numel]
        held = left.clone()
        left.copy_(right)
        right.copy_(held)
