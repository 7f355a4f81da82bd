"""Bytes of activations saved for backward, measured with `torch.autograd.graph.saved_tensors_hooks`.

    with SavedBytes(model) as saved:
        loss = model(tokens).sum()
    saved.bytes  # what autograd keeps alive for this forward, parameters excluded

Counting is per storage: a tensor saved by several ops (or views of one tensor) keeps one storage alive and is
counted once, at the storage's full size (a saved slice keeps its whole base alive). Storages of the `exclude`
module's parameters and buffers are skipped, whether autograd saves the tensor itself or a view of it (F.linear
saves W^T, RoPE slices its cos/sin tables): they live whether or not a backward is pending. Copies made from
parameters (e.g. autocast's BF16 weight casts) are real extra memory and are counted.
"""

from __future__ import annotations

from typing import Iterable, Optional, Set

import torch
from torch import nn


def _storage_key(t: torch.Tensor):
    """(data pointer, bytes) of the memory `t` keeps alive; None for tensors without plain storage (meta, sparse)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if t.device.type == "meta":
        return None
    return storage.data_ptr(), storage.nbytes()


class SavedBytes:
    """Context manager summing the distinct storages saved for backward inside it (model state excluded).

    `exclude`: a module (its parameters and buffers) or an iterable of tensors."""

    def __init__(self, exclude: Optional[nn.Module | Iterable[torch.Tensor]] = None):
        if isinstance(exclude, nn.Module):
            state = [*exclude.parameters(), *exclude.buffers()]
        else:
            state = list(exclude or ())
        self._param_ptrs: Set[int] = {t.untyped_storage().data_ptr() for t in state if t.device.type != "meta"}
        self._seen: Set[int] = set()
        self.bytes = 0
        self.tensors = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is None:
            # No storage to share: count the tensor's own elements.
            self.bytes += t.numel() * t.element_size() if t.layout == torch.strided else 0
            self.tensors += 1
        elif key[0] not in self._param_ptrs and key[0] not in self._seen:
            self._seen.add(key[0])
            self.bytes += key[1]
            self.tensors += 1
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
