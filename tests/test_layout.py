"""The repository layout: the top-level kernels/ never shadows a dependency (issue 16)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_from_repo_root(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_kernels_from_the_repo_root_is_not_ours():
    # transformers imports a third-party package named `kernels`; ours must not win
    where = _run_from_repo_root(
        "import kernels; print(getattr(kernels, '__file__', None) or list(kernels.__path__))"
    )
    assert str(REPO / "kernels" / "__init__.py") not in where
    assert where != str([str(REPO / "kernels")]) or _third_party_kernels_absent()


def _third_party_kernels_absent() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


def test_streammerge_kernels_are_the_top_level_kernels_directory():
    where = _run_from_repo_root("import streammerge.kernels.cpu_merge as m; print(m.__file__)")
    assert Path(where) == REPO / "kernels" / "cpu_merge.py"


def test_transformers_llama_imports_from_the_repo_root():
    pytest = __import__("pytest")
    pytest.importorskip("transformers")
    out = _run_from_repo_root("from transformers import LlamaForCausalLM; print('ok')")
    assert out.endswith("ok")


# The package follows the data path (docs/ARCHITECTURE.md, "Map of the code"). Each
# subpackage, and each module left at the top of the package, is one node; an import of
# streammerge.x... anywhere in a module (lazy ones in functions included) is an edge. The
# nodes in the order their imports flow: each may import only the ones before it.
LAYERS = (
    "errors", "notices", "sizes", "names", "sysinfo", "vector_width", "kernel_source",  # shared
    "methods", "io", "recipe", "plan", "output", "exec",  # the data path's subpackages
    "api_types", "api", "dryrun", "jobs", "cli",  # front doors: merge(), --plan, sweep, Ray, CLI
    "__main__", "__init__",
)  # fmt: skip

#: Line limit of one module, and the modules still over it (the set must shrink, never grow).
MAX_LINES = 500
KNOWN_OVER: set[str] = set()

PACKAGE = REPO / "streammerge"


def _node(parts: list[str]) -> str | None:
    """The graph node of ``streammerge.<parts>``, None for the package itself or kernels."""
    if not parts or parts[0] == "kernels":
        return None
    if (PACKAGE / parts[0]).is_dir() or (PACKAGE / f"{parts[0]}.py").is_file():
        return parts[0]
    return None  # an attribute of the package (``from streammerge import __version__``)


def _import_graph() -> dict[str, set[str]]:
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] == "kernels":
            continue
        me = rel[0].removesuffix(".py")
        edges = graph.setdefault(me, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mod = node.module.split(".")
                targets = [mod + [a.name] for a in node.names] if mod == ["streammerge"] \
                    else [mod]  # fmt: skip
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{path}: relative import")
            for t in targets:
                if t[0] == "streammerge" and (dep := _node(t[1:])) not in (None, me):
                    edges.add(dep)
    return graph


def test_the_package_import_graph_has_no_cycles():
    graph = _import_graph()
    assert {"methods", "io", "recipe", "plan", "output", "exec", "jobs"} <= set(graph)
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + (node,)))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + (node,))
        done.add(node)

    for node in sorted(graph):
        visit(node, ())


def test_imports_flow_one_way_along_the_layers():
    graph = _import_graph()
    assert set(graph) == set(LAYERS), "a new subpackage or top-level module: place it in LAYERS"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                    if rank[b] >= rank[a])  # fmt: skip
    assert not upward, upward


def test_no_module_is_over_the_line_limit():
    over = {
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*.py")
        if len(p.read_text().splitlines()) > MAX_LINES
    }
    assert over == KNOWN_OVER, (
        f"over {MAX_LINES} lines: {sorted(over - KNOWN_OVER)} new; "
        f"{sorted(KNOWN_OVER - over)} no longer over (drop them from KNOWN_OVER)"
    )


#: Line limit of one function (its def to its last line, docstring included), and the
#: functions still over it as "path:name" (the set must shrink, never grow).
MAX_FUNCTION_LINES = 80
KNOWN_LONG: set[str] = set()


def test_no_function_is_over_the_line_limit():
    import ast

    long = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:  # fmt: skip
                long.add(f"{path.relative_to(REPO)}:{node.name}")
    assert long == KNOWN_LONG, (
        f"over {MAX_FUNCTION_LINES} lines: {sorted(long - KNOWN_LONG)} new; "
        f"{sorted(KNOWN_LONG - long)} no longer over (drop them from KNOWN_LONG)"
    )


def test_no_module_imports_another_modules_private_names():
    """A name starting with ``_`` is its module's own: importing it from another module of
    the package means it should be public, with a docstring (issue 16). (The kernel files
    share their ``@triton.jit`` building blocks, such as ``_load_f32``, among themselves.)"""
    import ast

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("streammerge")):  # fmt: skip
                continue
            found += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert not found, found
