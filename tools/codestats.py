"""Size and shape figures of tclf's code, to compare a restructuring before and after.

    python tools/codestats.py                 # static figures (no TensorFlow)
    python tools/codestats.py --records R     # also: load_manifest calls in one tiny training

Counted with Python's ast module, from the files as they are: lines in tclf/, the longest
functions and those over 60 lines, the largest module, function-local imports of tclf's own
modules, direct tf.io.gfile uses outside tclf/storage.py, uses of other libraries' private API
(a ``.src.`` or ``.python.`` module, or a ``_name`` reached on another library's object)
outside the compatibility modules, private attributes reached from outside their object (``x._name``
with x not self or cls), and the README's lines.
"""

from __future__ import annotations

import ast
import os
import sys

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tclf")
LONG = 60  # Lines: a function longer than this is listed.
COMPAT = ("compat",)  # Module names (any part of the path) allowed to use private APIs.
PUBLIC_UNDERSCORED = {"_exit", "_replace", "_asdict", "_fields", "_make"}  # os, namedtuple.
LIBRARIES = ("keras", "keras_tuner", "tensorflow", "tf", "h5py", "librosa", "numpy", "np")


def modules() -> list[str]:
    found = []
    for folder, _, names in os.walk(PACKAGE):
        found += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(found)


def relative(path: str) -> str:
    return os.path.relpath(path, ROOT)


def functions(tree) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function, methods and nested ones included."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def local_imports(tree) -> int:
    """Imports of tclf's own modules inside a function body."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if (isinstance(inner, ast.ImportFrom)
                        and (inner.module or "").split(".")[0] == "tclf"):
                    count += 1
                elif isinstance(inner, ast.Import) and any(
                        a.name.split(".")[0] == "tclf" for a in inner.names):
                    count += 1
    return count


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        parts.append(_dotted(node.func) + "()")
    return ".".join(reversed(parts))


def gfile_uses(tree) -> int:
    """``tf.io.gfile.X`` (or ``gfile.X``) attribute uses."""
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Attribute) and node.value.attr == "gfile")


def private_uses(tree) -> list[str]:
    """Other libraries' private API: imports of their .src/.python modules, and ``_names``
    read on a name bound to one of them."""
    found, library_names = [], set(LIBRARIES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] in LIBRARIES and ({"src", "python"} & set(parts[1:])
                                          or any(p.startswith("_") for p in parts[1:])):
                found.append(f"from {node.module} import ...")
            if parts[0] in LIBRARIES:
                library_names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES:
                    library_names.add(alias.asname or parts[0])
                    if {"src", "python"} & set(parts[1:]):
                        found.append(f"import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            base = _dotted(node.value).split(".")[0]
            if base in library_names:
                found.append(f"{_dotted(node.value)}.{node.attr}")
    return found


def reached_private(tree) -> list[str]:
    """``x._name`` where x is not self or cls: a private attribute reached from outside its
    object (another library's, or another tclf module's)."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and node.attr not in PUBLIC_UNDERSCORED):
            base = _dotted(node.value)
            if base.split(".")[0] not in ("self", "cls", "super()"):
                found.append(f"{base}.{node.attr}")
    return found


def static_figures() -> dict:
    per_module, all_functions, local, gfile, private, reached = {}, [], 0, 0, [], []
    for path in modules():
        text = open(path, encoding="utf-8").read()
        tree = ast.parse(text)
        name = relative(path)
        per_module[name] = len(text.splitlines())
        all_functions += [(f"{name}:{f}", n) for f, n in functions(tree)]
        local += local_imports(tree)
        if not path.endswith(os.path.join("tclf", "storage.py")):
            gfile += gfile_uses(tree)
        if not any(part in COMPAT for part in name.replace(".py", "").split(os.sep)):
            private += [f"{name}: {use}" for use in private_uses(tree)]
            reached += [f"{name}: {use}" for use in reached_private(tree)]
    all_functions.sort(key=lambda f: -f[1])
    readme = os.path.join(ROOT, "README.md")
    return {"lines in tclf/": sum(per_module.values()),
            "modules": len(per_module),
            "largest module": max(per_module.items(), key=lambda m: m[1]),
            "longest function": all_functions[0],
            f"functions over {LONG} lines": [f for f in all_functions if f[1] > LONG],
            "function-local imports of tclf modules": local,
            "tf.io.gfile uses outside storage.py": gfile,
            "private API uses outside compat modules": private,
            "private attributes reached from outside their object": reached,
            "README lines": len(open(readme, encoding="utf-8").read().splitlines())}


def manifest_loads(records: str) -> int:
    """schema.load_manifest calls in one tiny CPU training run on ``records``."""
    import tempfile

    from tclf.data import schema
    from tclf.training import train
    from tclf.training.config import TINY

    calls = [0]
    original = schema.load_manifest

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    # Every module that imported the name gets the counting one.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("tclf") and getattr(
                module, "load_manifest", None) is original:
            module.load_manifest = counted
    with tempfile.TemporaryDirectory() as models:
        train.train(train.TrainConfig(records=records, models=models, gpus="none",
                                      precision="float32", verbose=0, **TINY))
    return calls[0]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--records", default=None, help="A packed records folder: also count the "
                                              "manifest loads of one tiny training on it.")
def main(records):
    """Print tclf's code figures (tools/codestats.py)."""
    figures = static_figures()
    if records:
        import tclf.data.reader  # noqa: F401 - every module that reads the manifest, loaded first.
        import tclf.evaluation.evaluate  # noqa: F401
        import tclf.training.backbone_cache  # noqa: F401
        figures["load_manifest calls in one tclf-train run"] = manifest_loads(records)
    for name, value in figures.items():
        if isinstance(value, list):
            click.echo(f"{name}: {len(value)}")
            for item in value:
                click.echo(f"  {item[0]} ({item[1]} lines)" if isinstance(item, tuple)
                           else f"  {item}")
        elif isinstance(value, tuple):
            click.echo(f"{name}: {value[0]} ({value[1]} lines)")
        else:
            click.echo(f"{name}: {value}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
