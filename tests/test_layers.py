"""The project's modules import each other without cycles, counting imports inside functions too
(so no function-level import can be hiding one), and lower layers never receive the trainer."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('metrics', 'faceseg', 'inference', 'scripts')


def project_modules() -> dict[str, Path]:
    """Dotted module name → file, for the root modules and the packages (tests left out)."""
    modules = {path.stem: path for path in ROOT.glob('*.py')}
    for package in PACKAGES:
        for path in (ROOT / package).glob('*.py'):
            modules[package if path.stem == '__init__' else f'{package}.{path.stem}'] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports, at any depth of its code."""
    package = name if path.stem == '__init__' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.') if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = '.'.join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f'{base}.{alias.name}' for alias in node.names)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert 'model' in graph['checkpoints'] and 'networks' in graph['model']
    assert 'metrics.evaluator' in graph['metrics.training']   # relative import
    assert 'inference.phases' in graph['main']                 # import inside a function


def test_no_import_cycles_even_through_function_level_imports():
    assert find_cycle(import_graph()) is None, ' -> '.join(find_cycle(import_graph()))


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph['networks'] = graph['networks'] | {'ugatit'}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_lower_layers_never_take_the_trainer():
    """No function outside the trainer has a parameter named ``trainer`` (they take RunFiles,
    modules, state dicts and values)."""
    offenders = []
    for name, path in project_modules().items():
        if name in ('ugatit',) or name.startswith('scripts.'):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(arg.arg == 'trainer' for arg in node.args.args + node.args.kwonlyargs):
                    offenders.append(f'{name}.{node.name}')
    assert not offenders, offenders
