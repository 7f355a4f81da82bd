"""A Hugging Face LLaMA directory -> the logical megaeff state of the configured model and method.

What each method starts from, for a pretrained dense W0 (out x in) of a projection:

- `dense`: W0 itself (relative error 0).
- `lowrank`: the best rank-r approximation, B A = U_r S_r V_r^T (Eckart-Young), split evenly: B = U_r S_r^(1/2),
  A = S_r^(1/2) V_r^T.
- `sltrain`: W = s B A + S (s = alpha / r). s B A = U_r S_r V_r^T with the same even split of (U_r S_r V_r^T) / s,
  and S = the residual W0 - s B A sampled on the layer's support, which is SLTrain's fixed random support
  regenerated from (train.seed, name) by the layer's own init, as in training. W equals W0 exactly on the support.
- `lost`: LOST's own initialization (megaeff/layers/lost.py: SVD, balanced factors, channel scores from the
  complement, W_s = W0's selected columns) run by the layer itself on the pretrained W0 instead of a random draw.
  The channel set then depends on W0, so the trainer also hands W0 to the model's materialization
  (`Initializer(weights=...)`): every rank, every layout and every resume regenerate that same channel set.

The SVDs run in float64 on the CPU with one thread (as LOST's do) and canonical signs (the largest-magnitude entry
of each left singular vector positive), so every rank computes bit-identical factors. Embeddings, norms and the
head are copied. The reconstruction error of each projection, ||W_eff - W0||_F / ||W0||_F, comes back with the
state (for LOST with f = silu, W_eff takes f as the identity). Weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Dict, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import nn

from megaeff.config.pretrained import read_hf_config
from megaeff.errors import CheckpointError
from megaeff.interop.layers import LayerSpec, build_layer, effective_weight, layer_specs, logical_model, relative_error
from megaeff.interop.safetensors_io import HFWeights

if TYPE_CHECKING:
    from megaeff.config.schema import Config


class ImportResult(NamedTuple):
    state: Dict[str, torch.Tensor]  # logical name -> tensor (the requested keys)
    errors: Dict[str, float]  # projection name -> relative reconstruction error


def pretrained_weights(path: str) -> HFWeights:
    """The directory's tensors by logical megaeff name (lazy, fp32; a tied head answers with the embedding)."""
    hf = read_hf_config(path)
    return HFWeights(path, tied=bool(hf.get("tie_word_embeddings", False)))


@contextlib.contextmanager
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def truncated_svd(W0: torch.Tensor, rank: int, scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in float64 with scale * B A the best rank-`rank` approximation of W0, split evenly."""
    with one_thread():
        U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    U, Vh = U * signs, Vh * signs[:, None]
    root = (S[:rank] / scale).sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def convert_layer(cfg: Config, spec: LayerSpec, W0: torch.Tensor) -> nn.Module:
    """The single-process layer `spec` holding the configured method's start from the pretrained `W0`."""
    method = cfg.method.name
    if method == "lost":
        return build_layer(cfg, spec, weights={f"{spec.name}.weight": W0})
    layer = build_layer(cfg, spec)  # the seed's init: SLTrain's support (the rest is overwritten)
    if method == "dense":
        layer.weight.copy_(W0)
    elif method in ("lowrank", "sltrain"):
        scale = getattr(layer, "scale", 1.0)
        B, A = truncated_svd(W0, layer.rank, scale)
        layer.B.copy_(B)
        layer.A.copy_(A)
        if method == "sltrain":
            # From the stored (fp32) factors, so that W equals W0 on the support up to one rounding.
            residual = W0.double() - scale * (layer.B.double() @ layer.A.double())
            layer.sparse_values.copy_(residual.view(-1)[layer.sparse_index.long()])
    else:
        raise ValueError(f"no import rule for method {method!r}")
    return layer


def _check_shape(path, name: str, got: torch.Tensor, want: torch.Size) -> None:
    if tuple(got.shape) != tuple(want):
        raise CheckpointError(path, f"{name} has shape {tuple(got.shape)}, the configured model {tuple(want)}")


def _read(weights: HFWeights, name: str) -> torch.Tensor:
    if name not in weights:
        raise CheckpointError(weights.path, f"has no tensor for {name} (Hugging Face name expected by megaeff)")
    return weights[name]


def import_hf(path: str, cfg: Config, keys: Optional[Iterable[str]] = None) -> ImportResult:
    """The logical state of the configured model (`keys`: only these, e.g. a pipeline stage's), converted from
    the Hugging Face LLaMA directory `path`, with each converted projection's reconstruction error."""
    weights = pretrained_weights(path)
    model = logical_model(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wanted = set(shapes) if keys is None else set(keys) & set(shapes)
    specs = layer_specs(model)
    owned = {f"{s.name}.{k}" for s in specs for k in model.get_submodule(s.name).state_dict()}
    state: Dict[str, torch.Tensor] = {}
    for name in sorted(wanted - owned):
        state[name] = _read(weights, name)
        _check_shape(path, name, state[name], shapes[name])
    errors: Dict[str, float] = {}
    for spec in specs:
        if not any(k.startswith(spec.name + ".") for k in wanted):
            continue
        W0 = _read(weights, f"{spec.name}.weight")
        _check_shape(path, f"{spec.name}.weight", W0, torch.Size([spec.out_features, spec.in_features]))
        layer = convert_layer(cfg, spec, W0)
        state.update({f"{spec.name}.{k}": v.detach() for k, v in layer.state_dict().items()})
        errors[spec.name] = relative_error(effective_weight(layer, linearize=True), W0)
    return ImportResult({k: v for k, v in state.items() if k in wanted}, errors)
