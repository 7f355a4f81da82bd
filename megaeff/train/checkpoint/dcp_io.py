"""torch.distributed.checkpoint (DCP) for megaeff's checkpoints: the planners that resolve `LogicalTensor` chunks
(pieces.py), a writer, and a reader that never unpickles untrusted bytes.

DCP's own reader loads `.metadata` with `pickle.load`, which runs whatever the file says. `read_metadata` here
unpickles it with an allowlist: DCP's metadata dataclasses, `torch.Size`, dtypes, layouts, paths; anything
else (os.system, eval, ...) is refused with a CheckpointError. It then checks that every data file the metadata
refers to is a plain `__<r>_<i>.distcp` name. Byte items (pickled objects in DCP's format) are refused too: a
megaeff checkpoint has none (the non-tensor state lives in weights_only files beside), and DCP would load them
with `weights_only=False`. Tensor data is read by DCP with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from megaeff.errors import CheckpointError
from megaeff.train.checkpoint.files import raise_if_disk_full
from megaeff.train.checkpoint.pieces import LogicalTensor

METADATA = ".metadata"
DATA_FILE = re.compile(r"__\d+_\d+\.distcp")
_DCP = "torch.distributed.checkpoint."
ALLOWED = {
    _DCP + "metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    _DCP + "filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of a checkpoint directory, unpickled with the allowlist (see the module docstring)."""
    path = Path(path)
    try:
        data = (path / METADATA).read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read {METADATA}: {exc.strerror or exc}") from None
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # UnpicklingError for a refused global; anything for a damaged file
        raise CheckpointError(path, f"{METADATA} is not DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(path, f"{METADATA} is not DCP metadata (a {type(md).__name__})")
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise CheckpointError(path, f"{METADATA}: {key} is not a tensor (megaeff checkpoints hold only tensors)")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not DATA_FILE.fullmatch(rel):
            raise CheckpointError(path, f"{METADATA} refers to a data file {rel!r}, not a __<rank>_<n>.distcp name")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is the one `read_metadata` checked (never `pickle.load`)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner (de-duplication of replicated chunks included) on a flat dict of
    LogicalTensors. A chunk is a view; DCP's loader copies a view whose storage is larger before torch.save, so
    only the chunk's bytes reach the file."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        obj = self.state_dict[index.fqn]
        if isinstance(obj, LogicalTensor):
            return obj.__get_tensor_shard__(index)
        return super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner on a flat dict of LogicalTensors: reads go straight into the chunk views. The
    state dict is used as given (the default one would replace objects it does not know by None)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = state_dict
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, LogicalTensor):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(read_item.dest_index.fqn, "is a pickled object; megaeff checkpoints hold only tensors")


def dcp_save(
    state: Dict[str, LogicalTensor], directory: Path, group=None, writer: Optional[type] = None, local: bool = False
) -> None:
    """Write this rank's chunks (collective over `group`, default the world): DCP plans on rank 0 of the group,
    every rank writes its `__<rank>_0.distcp`, rank 0 writes `.metadata` last. A rank's failure raises on all
    ranks; a full disk anywhere is a DiskFullError everywhere. `local`: one process writes it all (converters)."""
    storage = (writer or FileSystemWriter)(str(directory), single_file_per_rank=True, sync_files=True)
    no_dist = local or not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is what was asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=storage, planner=SavePlanner(), process_group=group, no_dist=no_dist)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        for failure in _failures(exc):
            raise_if_disk_full(failure, directory)
        raise


def dcp_load(
    state: Dict[str, LogicalTensor], directory: Path, metadata: Metadata, group=None, local: bool = False
) -> None:
    """Fill every chunk of `state` from the checkpoint (collective over `group`; `local`: in this process only)."""
    no_dist = local or not (dist.is_available() and dist.is_initialized())
    try:
        reader = SafeReader(directory, metadata)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=LoadPlanner(), process_group=group, no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:
        for failure in _failures(exc):
            if isinstance(failure, CheckpointError):
                raise failure from None
        first = next(iter(_failures(exc)), exc)
        raise CheckpointError(directory, f"cannot read its tensors: {type(first).__name__}: {first}") from None


def _failures(exc: BaseException):
    """The per-rank exceptions inside DCP's CheckpointException (or the exception itself)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        for wrapped in failures.values():
            yield wrapped[0] if isinstance(wrapped, tuple) else wrapped
    else:
        yield exc
