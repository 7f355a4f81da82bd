"""The package's shape, checked from its source (docs/architecture.md states the rules):

- layering: a package imports only the packages below it in
  config < data < layers < models < interop < precision < kernels < optim < distributed < train < cli
  (megaeff.errors, below them all, is free to use; a `__main__.py` is an entry point, a command line by nature,
  and may start the CLI);
- no module imports a private (`_name`) from another module;
- no file over 500 lines, no function over 80 lines unless its docstring says why ("Long because");
- every public signature (and every `__init__`) types its `dims` (ParallelDims) and its config parameters.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import megaeff

PACKAGE = Path(megaeff.__file__).resolve().parent
ORDER = "config data layers models interop precision kernels optim distributed train cli".split()
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# Parameters a public signature must annotate: the ParallelDims and the megaeff.config sections.
TYPED_PARAMETERS = {"dims", "cfg", "pcfg", "ocfg", "dcfg", "mcfg", "tcfg", "lcfg", "method", "config"}
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if not {"_conf", "_csrc"} & set(p.parts))


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "megaeff" and parts[1] in ORDER else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, here: str, is_package: bool):
    """(imported module, names) of every megaeff import in the tree, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names if a.name.startswith("megaeff"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = here.split(".") if is_package else here.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                module = ".".join(parts + ([module] if module else []))
            if module.startswith("megaeff"):
                yield module, [a.name for a in node.names]


def _violations():
    layering, private = [], []
    for path in SOURCES:
        here = _module_name(path)
        mine = None if path.name == "__main__.py" else _layer(here)
        for module, names in _imports(ast.parse(path.read_text()), here, path.name == "__init__.py"):
            theirs = _layer(module)
            if mine and theirs and ORDER.index(theirs) > ORDER.index(mine):
                layering.append(f"{here} imports {module}")
            private += [f"{here} imports {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    return layering, private


def test_packages_import_only_the_layers_below_them():
    layering, _ = _violations()
    assert layering == []


def test_no_private_name_is_imported_across_modules():
    _, private = _violations()
    assert private == []


def test_files_and_functions_stay_small():
    too_long = []
    for path in SOURCES:
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def _untyped_parameters(tree: ast.AST):
    """(line, function, parameter) of every TYPED_PARAMETERS parameter without an annotation in a public function
    or method (a name without a leading underscore) or an `__init__`."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_") and node.name != "__init__":
            continue
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]:
            if arg.arg in TYPED_PARAMETERS and arg.annotation is None:
                yield node.lineno, node.name, arg.arg


def test_public_signatures_type_dims_and_configs():
    untyped = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name}({param})"
        for path in SOURCES
        for line, name, param in _untyped_parameters(ast.parse(path.read_text()))
    ]
    assert untyped == [], f"{len(untyped)} unannotated dims/config parameters:\n" + "\n".join(untyped)


def test_the_signature_check_sees_an_untyped_config():
    tree = ast.parse("def f(dims, cfg: Config): ...\ndef _g(cfg): ...\nclass A:\n    def __init__(self, method): ...\n")
    assert list(_untyped_parameters(tree)) == [(1, "f", "dims"), (4, "__init__", "method")]


@pytest.mark.parametrize("bad", ["megaeff.train.trainer", "megaeff.cli.train"])
def test_the_layering_check_sees_an_upward_import(bad):
    """The checker itself: an upward import in a lower package is reported."""
    tree = ast.parse(f"from {bad} import Trainer\n")
    found = [m for m, _ in _imports(tree, "megaeff.distributed.comm", False)]
    assert found == [bad] and ORDER.index(_layer(bad)) > ORDER.index("distributed")
