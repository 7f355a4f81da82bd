"""`<run_dir>/sltrain_costs.json`: SLTrain's agreed path costs kept with the run, so that a resumption into the same
run directory takes the same paths as the run it continues (megaeff/layers/sltrain_costs.py measures and agrees
on them; this module only reads and writes the file).

Plain JSON, nothing unpickled:
    {"format": "megaeff-sltrain-costs", "version": 1,
     "measured_with": {"torch": "2.13.0", "threads": 2, "device": "..."},
     "costs": [{"m": 512, "n": 1376, "nnz": 21135, "training": true, "tokens": 1024, "dtype": "float32",
                "device": "cpu", "c": 114.2}, ...]}
A cost is looked up by everything it was measured at: the layer shape (m, n, nnz), forward + backward or forward
only, the clamped tokens per call, the dtype and the device type. `measured_with` is for the reader only (the
machine the costs describe) and is never compared: a resumption on another machine keeps the old costs, and so
the old paths. JSON writes a float64 as its shortest round-tripping decimal, so the costs read back are the bits
the run used. Global rank 0 alone reads and writes the file, whole (a temporary file renamed into place: a crash
leaves the old file or the new one). A file of another format raises one MegaeffError naming it.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Dict, Tuple

import torch

from megaeff.errors import MegaeffError

COST_FILE = "sltrain_costs.json"
FORMAT, VERSION = "megaeff-sltrain-costs", 1
FIELDS = ("m", "n", "nnz", "training", "tokens", "dtype", "device")
# (m, n, nnz, training, tokens, dtype name, device type): what one cost was measured at.
FileKey = Tuple[int, int, int, bool, int, str, str]


class CostFileError(MegaeffError):
    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"SLTrain cost file '{path}': {message}")


def file_key(key: Tuple[int, int, int], training: bool, tokens: int, dtype: torch.dtype, device) -> FileKey:
    return (*key, bool(training), int(tokens), str(dtype).removeprefix("torch."), torch.device(device).type)


def _record(row, i: int) -> Tuple[FileKey, float]:
    """One entry of "costs", checked: exactly FIELDS and "c", of their types, c finite and positive."""
    if not isinstance(row, dict) or set(row) != {*FIELDS, "c"}:
        raise ValueError(f"costs[{i}] must be an object with exactly the keys {', '.join((*FIELDS, 'c'))}")
    ints, strs = [row[k] for k in ("m", "n", "nnz", "tokens")], [row["dtype"], row["device"]]
    c = row["c"]
    if not all(type(v) is int and v > 0 for v in ints) or not all(isinstance(v, str) for v in strs):
        raise ValueError(f"costs[{i}]: m, n, nnz and tokens must be positive integers, dtype and device strings")
    if type(row["training"]) is not bool or type(c) not in (int, float) or not (math.isfinite(c) and c > 0):
        raise ValueError(f"costs[{i}]: training must be true or false and c a positive finite number")
    return tuple(row[k] for k in FIELDS), float(c)


def load_costs(path: Path) -> Dict[FileKey, float]:
    """The costs the file holds; {} when there is no file."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_bytes().decode())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} file of version {VERSION}")
        if not isinstance(doc.get("costs"), list):
            raise ValueError("'costs' is not a list")
        return dict(_record(row, i) for i, row in enumerate(doc["costs"]))
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise CostFileError(
            path,
            f"unreadable ({exc}); delete it to measure the costs again (a resumed run may then take other paths), "
            "or set method.sltrain_costs=fixed",
        ) from None


def measured_with(device) -> Dict:
    """What the costs describe, for the reader: torch, its CPU threads and the device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": f"{device.type}: {name}"}


def save_costs(path: Path, costs: Dict[FileKey, float], device) -> None:
    """Write `costs` (all of them: the file's old entries too) as the whole file, atomically."""
    path = Path(path)
    rows = [{**dict(zip(FIELDS, key)), "c": c} for key, c in sorted(costs.items())]
    doc = {"format": FORMAT, "version": VERSION, "measured_with": measured_with(device), "costs": rows}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CostFileError(path, f"cannot be written ({exc.strerror or exc})") from None
