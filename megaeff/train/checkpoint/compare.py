"""Does a checkpoint fit the configured model? Names, shapes and dtypes of the logical tensors compared before any
byte is read, and the differences said in a few lines (which tensor, how: shape a vs b, missing, unexpected)
instead of torch's state-dict dump."""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from megaeff.train.checkpoint.pieces import pieces_of

Spec = Tuple[Optional[Tuple[int, ...]], Optional[torch.dtype]]  # (logical shape or None: unknown here, dtype)
SHOWN = 4


def expected_model(model, logical) -> Dict[str, Spec]:
    """Logical name -> (logical shape, dtype) of this rank's model tensors, with no communication (a tensor with no
    box form has the name and dtype only)."""
    out: Dict[str, Spec] = {}
    for name, t in model.state_dict().items():
        pieces = pieces_of(logical, name, "", t.detach())
        if pieces is None:
            out[name] = (None, t.dtype)
        else:
            out.update({n: (tuple(p.shape), p.dtype) for n, p in pieces.items()})
    buffers = getattr(logical, "logical_buffers", None) if logical is not None else None
    for name, t in (buffers() if buffers is not None else {}).items():
        out[name] = (tuple(t.shape), t.dtype)
    return out


def _some(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def describe_mismatch(expected: Dict[str, Spec], saved: Dict[str, Spec], all_names=None) -> Optional[str]:
    """None when `saved` (the checkpoint's model tensors) fits `expected` (this rank's); else the message.
    `all_names`: every logical name of the model when this rank holds only some (a pipeline stage)."""
    known = set(all_names) if all_names is not None else set(expected)
    lines = []
    differ = []
    for name in sorted(set(expected) & set(saved)):
        (shape, dtype), (s_shape, s_dtype) = expected[name], saved[name]
        if shape is not None and tuple(s_shape) != tuple(shape):
            differ.append(f"{name}: checkpoint {tuple(s_shape)} vs model {tuple(shape)}")
        elif s_dtype is not None and dtype is not None and s_dtype != dtype:
            differ.append(f"{name}: checkpoint {s_dtype} vs model {dtype}")
    lines += differ[:SHOWN] + ([f"... and {len(differ) - SHOWN} more that differ"] if len(differ) > SHOWN else [])
    missing = set(expected) - set(saved) if all_names is None else known - set(saved)
    if missing:
        lines.append(f"missing from the checkpoint: {_some(missing)}")
    unexpected = set(saved) - known
    if unexpected:
        lines.append(f"unexpected in the checkpoint: {_some(unexpected)}")
    if not lines:
        return None
    head = "model weights do not match the configured model (another model size, method or GQA layout?):"
    return "\n  ".join([head, *lines])
