"""The rooms of the code and the direction of their imports (README "Architecture").

Every import of our own modules counts, at the top of a file or inside a function: an
import moved into a function to dodge a cycle is still a cycle here.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"fqcompile": "fqcompile", "calibration": "fqcompile.calibration", "kernels": "fqcompile.kernels",
           "formats": "fqcompile.formats"}
# Leaves every room may use: they import nothing of ours but each other and formats.
SHARED = {"fqcompile", "fqcompile.errors", "fqcompile.files", "fqcompile.processes", "fqcompile.sources"}
# The runtime's generate path, which the offline stages never import.
RUNTIME = {"fqcompile.flex_linear", "fqcompile.loader", "fqcompile.generation", "fqcompile.slim", "fqcompile.decoding",
           "fqcompile.controller", "fqcompile.evaluation", "fqcompile.bench", "fqcompile.demo", "fqcompile.cli",
           "fqcompile.cli_options", "fqcompile.inspection", "fqcompile.gptq_export"}


def module_name(path: Path) -> str:
    package = FOLDERS[path.parent.name]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def our_imports(path: Path) -> set[str]:
    """The modules of ours that `path` imports anywhere in it (names resolved to modules)."""
    me = module_name(path)
    package = me if path.stem == "__init__" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:  # `from . import x` imports module x; `from .m import f` module m
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != me}


MODULES = {module_name(p): p for folder in FOLDERS for p in (REPO / folder).glob("*.py")}
GRAPH = {name: our_imports(path) for name, path in MODULES.items()}


def room(name: str) -> str:
    if name in SHARED:
        return "shared"
    if name.startswith(("fqcompile.formats", "fqcompile.kernels", "fqcompile.calibration")):
        return name.split(".")[1]
    return "runtime" if name in RUNTIME else "stages"


ALLOWED = {  # room -> the rooms it may import
    "formats": {"formats", "shared"},
    "shared": {"shared", "formats"},
    "kernels": {"kernels", "formats", "shared"},
    "calibration": {"calibration", "formats", "kernels", "shared"},
    "stages": {"stages", "calibration", "formats", "kernels", "shared"},
    "runtime": {"runtime", "stages", "calibration", "formats", "kernels", "shared"},
}


def test_imports_run_one_way_between_the_rooms():
    wrong = [f"{a} ({room(a)}) imports {b} ({room(b)})" for a, deps in GRAPH.items() for b in deps
             if room(b) not in ALLOWED[room(a)]]
    assert not wrong, wrong


def test_formats_imports_nothing_of_ours_but_the_error_type():
    for name, deps in GRAPH.items():
        if room(name) == "formats":
            assert deps <= {"fqcompile", "fqcompile.errors"} | {d for d in deps if d.startswith("fqcompile.formats")}


def test_no_import_cycles():
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_checks_see_every_module_and_catch_a_cycle():
    """The graph is real (so the tests above can fail): the pipeline's own edges are in it."""
    assert {"fqcompile.exporter", "fqcompile.calibrator", "fqcompile.loader", "fqcompile.generation",
            "fqcompile.evaluation", "fqcompile.kernels.ops", "fqcompile.formats.nested"} <= set(MODULES)
    assert "fqcompile.calibrator" in GRAPH["fqcompile.exporter"]
    assert "fqcompile.formats.nested" in GRAPH["fqcompile.kernels.reference"]
    assert "fqcompile.loader" in GRAPH["fqcompile.generation"]


def test_no_source_file_is_too_long():
    """~400 lines for Python; the C++ kernels, split by job, under ~600 each."""
    long = [f"{p.relative_to(REPO)}: {n}" for folder in FOLDERS for p in (REPO / folder).iterdir()
            if p.suffix in (".py", ".cpp", ".h")
            and (n := len(p.read_text().splitlines())) > (400 if p.suffix == ".py" else 600)]
    assert not long, long
