"""Hugging Face weight files: sharded safetensors writing, and lazy reading by logical megaeff name.

Writing follows `save_pretrained`'s layout: one `model.safetensors` when everything fits under the shard limit,
else `model-0000k-of-0000n.safetensors` files plus `model.safetensors.index.json` (`weight_map`: tensor ->
file, `metadata.total_size`: bytes of all tensors). Shards are filled in order and a tensor is never split, so a
single tensor larger than the limit gets a shard of its own (as transformers does).

Reading never unpickles anything: only safetensors files are opened (`model.init_from` refuses a directory that
has only `pytorch_model.bin`). `HFWeights` opens the file of a tensor on each access, so it holds no handle, reads
only the tensors asked for (a pipeline stage reads its own), and is safe to use from the init's threads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Union

import torch

from megaeff.config.pretrained import WEIGHTS_FILE, WEIGHTS_INDEX
from megaeff.errors import CheckpointError, ConfigError
from megaeff.interop.names import from_hf, to_hf

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_EXTRA = "pip install 'megaeff[hf]'"


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("hf", f"Hugging Face interop needs safetensors: {_EXTRA}") from None
    return safetensors.torch


def parse_size(size: Union[int, str]) -> int:
    """Bytes of `5GB` (10^9, as transformers counts), `512MiB` (2^20) or a plain integer."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if m is None:
        raise ConfigError("--max-shard-size", f"{size!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    """Names grouped into shards of at most `max_bytes` each (in order; an oversized tensor alone)."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_weights(tensors: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: Union[int, str]) -> List[str]:
    """Write `tensors` (HF names) as `save_pretrained` would; returns the file names written."""
    st = safetensors_torch()
    shards = plan_shards(tensors, parse_size(max_shard_size))
    meta = {"format": "pt"}
    if len(shards) == 1:
        st.save_file({n: tensors[n].contiguous() for n in shards[0]}, str(out_dir / WEIGHTS_FILE), metadata=meta)
        return [WEIGHTS_FILE]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st.save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
        files.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [WEIGHTS_INDEX]


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face LLaMA directory by logical megaeff name, read on access as fp32 CPU tensors.
    A tied checkpoint (`tie_word_embeddings`, no `lm_head.weight`) answers `output.weight` with the embedding."""

    def __init__(self, path: Union[str, Path], tied: bool = False):
        self.path = Path(path)
        index = self.path / WEIGHTS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(index, f"unreadable index: {exc}") from None
        else:
            weight_map = {n: WEIGHTS_FILE for n in self._names(self.path / WEIGHTS_FILE)}
        self._files: Dict[str, str] = {}
        for hf_name, fname in weight_map.items():
            try:
                self._files[from_hf(hf_name)] = fname
            except KeyError:
                continue  # rotary inv_freq buffers of old exports and the like: nothing megaeff holds
        if tied and "output.weight" not in self._files and "tok_embeddings.weight" in self._files:
            self._tied = True
            self._files["output.weight"] = self._files["tok_embeddings.weight"]
        else:
            self._tied = False

    @staticmethod
    def _names(file: Path) -> List[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(file, f"cannot read safetensors: {exc}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fname = self._files[name]
        hf_name = to_hf("tok_embeddings.weight" if self._tied and name == "output.weight" else name)
        try:
            with safe_open(str(self.path / fname), framework="pt") as f:
                return f.get_tensor(hf_name).to(torch.float32)
        except Exception as exc:
            raise CheckpointError(self.path / fname, f"cannot read {hf_name}: {exc}") from None

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
