"""The project's modules import each other without cycles, counting imports inside functions too
(so no function-level import can be hiding one); lower layers never receive the trainer; each concern
has one home (errors, the run loop apart from the step, a typed config instead of raw flags)."""
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
    """No function outside the trainer and its run loop has a parameter named ``trainer`` (they take
    RunFiles, modules, state dicts and values)."""
    offenders = []
    for name, path in project_modules().items():
        if name in ('ugatit', 'training_loop') or name.startswith('scripts.'):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(arg.arg == 'trainer' for arg in node.args.args + node.args.kwonlyargs):
                    offenders.append(f'{name}.{node.name}')
    assert not offenders, offenders


def _tree(name: str) -> ast.Module:
    return ast.parse(project_modules()[name].read_text())


def test_every_exception_class_lives_in_errors():
    """One home for the errors users see: no other module defines an exception class (a private
    control-flow exception, named with a leading underscore, and the scripts' own are fine)."""
    offenders = []
    for name, path in project_modules().items():
        if name == 'errors' or name.startswith('scripts.'):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith('_') and any(
                    (isinstance(base, ast.Name) and base.id.endswith(('Error', 'Exception', 'Stopped', 'Diverged',
                                                                       'Full', 'Unreadable', 'Checkpoint')))
                    or (isinstance(base, ast.Attribute) and base.attr.endswith(('Error', 'Exception')))
                    for base in node.bases):
                offenders.append(f'{name}.{node.name}')
    assert not offenders, offenders


def test_the_loop_knows_no_trainer_class_and_the_trainer_no_loop():
    """training_loop runs any object with the Trainer protocol; ugatit holds no run lifecycle."""
    graph = import_graph()
    assert 'ugatit' not in graph['training_loop']
    assert not {'training_loop', 'run_folder', 'signals', 'monitor'} & graph['ugatit']
    lifecycle = {'lock', 'resume', 'GracefulStop', 'prune', 'atomic_save', 'TrainingDiverged', 'remove_leftovers'}
    names = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(_tree('ugatit'))
             if isinstance(n, (ast.Name, ast.Attribute))}
    assert not lifecycle & names, lifecycle & names


def test_no_function_of_the_trainer_or_the_loop_takes_the_raw_flags():
    """They read the typed config (config.Config), never an argparse Namespace."""
    offenders = []
    for module in ('ugatit', 'training_loop'):
        source = project_modules()[module].read_text()
        assert 'argparse' not in source and 'Namespace' not in source, module
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                raw = [a.arg for a in node.args.args if a.arg in ('cfg', 'flags', 'args')]
                offenders += [f'{module}.{node.name}({arg})' for arg in raw]
    assert not offenders, offenders


def test_the_trainer_class_stays_small():
    cls = next(n for n in _tree('ugatit').body if isinstance(n, ast.ClassDef) and n.name == 'UGATIT')
    assert cls.end_lineno - cls.lineno < 400
