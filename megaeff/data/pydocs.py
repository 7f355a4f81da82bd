"""A second built-in corpus (`data=pydocs`): the Python reference documentation's topics as CPython ships them.

`pydoc_data.topics` is part of the standard library (what `help("if")` prints): one plain-text document per topic
of the language reference (statements, the data model, operators, string methods, ...), English prose with grammar
rules and short code examples, about 0.5 MB on Python 3.11 (79 topics). Nothing to install. The text is whatever
this interpreter ships, so it differs between Python versions: the cache is keyed on the content, and
benchmarks name the Python version they ran on.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List

from megaeff.errors import DataError


def load_topics() -> Dict[str, str]:
    """{topic: text}, sorted by topic name so that the corpus order never depends on the interpreter's dict."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            "pydoc_data",
            "data=pydocs needs the standard library's pydoc_data package, which this Python installation lacks "
            "(some distributions strip it); use data=default or data=indexed",
        ) from None
    return {name: topics[name] for name in sorted(topics)}


def topic_names() -> List[str]:
    return list(load_topics())


def content_key() -> str:
    """A short hash of the topics' names and texts: the cache directory of their tokenized form."""
    digest = hashlib.sha256()
    for name, text in load_topics().items():
        digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:12]
