"""The package's imports run one way, bottom up:
utils <- parallel <- checkpoint <- models <- engine <- server <- cli (and the ``tpserve``
facade on top). Imports inside functions count too: a lazy import is still a dependency."""

import ast
from pathlib import Path

import tpserve

LAYERS = ["version", "utils", "parallel", "checkpoint", "models", "engine", "server", "cli", "__main__"]
ROOT = Path(tpserve.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The tpserve modules ``mod`` imports, anywhere in its body."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import submodule" imports the submodule; "from pkg import name", the package
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            names = subs if len(subs) == len(node.names) else subs + [target]
        else:
            continue
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name.startswith("tpserve") and name != mod:
                found.add(name)
    return found


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)  # the facade sits on top


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_is_in_a_layer():
    for mod in _modules():
        if mod != "tpserve":
            assert mod.split(".")[1] in LAYERS, f"{mod} is in no layer; add its package to LAYERS in the right place"


def test_imports_point_down():
    upward = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "imports that climb the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [m, d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
