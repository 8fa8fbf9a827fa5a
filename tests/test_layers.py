"""The import contract (pyproject.toml, [tool.importlinter]): core/ stays torch-free and independent of both sides,
and the service never imports training code; the command line (training/) may use the service's backends, never the
reverse. import-linter follows imports inside functions too."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def _circles(graph, package: str) -> list[list[str]]:
    """Strongly connected sets of more than one module among ``package`` and its descendants (Tarjan)."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in modules and not imported.startswith(package + "."):
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    """No import circle anywhere: imports inside functions and those for type checking count too, so a module's
    place in the house is fixed by what it imports."""
    import grimp

    graph = grimp.build_graph("core", "training", "service", cache_dir=None)
    circles = [c for package in ("core", "training", "service") for c in _circles(graph, package)]
    assert circles == [], circles


def test_the_service_imports_without_scipy_and_scikit_learn():
    """Importing the service (every start of a worker does) leaves scipy.stats, scikit-learn and pandas for the first
    evaluation: they took about a second of each start (BENCHMARKS.md, cold start)."""
    code = ("import sys, service.service; "
            "print(sorted(m for m in ('scipy.stats', 'sklearn', 'pandas', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[]"
