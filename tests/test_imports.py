"""The package's modules form floors: every import, at the top of a module or inside a function, points down.

A function-level import hides a cycle from Python (it only runs later) but not from a reader: `models` needing
`student` needing `models` is one tangle, however late the second import runs. So the graph here counts both kinds,
and it must be acyclic; its topological order is the floor plan printed on failure.
"""
import ast
from graphlib import TopologicalSorter, CycleError
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]/'sidclip_guide'
NAME = PKG.name


def module_imports(path: Path, modules: set[str]) -> set[str]:
    "The package modules `path` imports anywhere in its body: `from .x import`, `from . import x`, `from pkg.x import`, `import pkg.x`."
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1 or mod == NAME or mod.startswith(NAME + '.'):
                rest = mod[len(NAME):].lstrip('.') if node.level == 0 else mod
                if rest: found.add(rest.split('.')[0])
                else: found |= {a.name for a in node.names if a.name in modules}   # from . import x / from pkg import x
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith(NAME + '.')}
    return (found & modules) - {path.stem}


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    "Module -> the package modules it imports (top-level and function-level alike)."
    modules = {p.stem for p in pkg.glob('*.py')}
    return {p.stem: module_imports(p, modules) for p in sorted(pkg.glob('*.py'))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import cycle as [a, b, ..., a], or None."
    try: TopologicalSorter(graph).prepare(); return None
    except CycleError as e: return list(reversed(e.args[1]))


def floors(graph: dict[str, set[str]]) -> list[list[str]]:
    "The modules by floor: floor 0 imports nothing of the package, floor n only from floors below n."
    level: dict[str, int] = {}
    for m in TopologicalSorter(graph).static_order(): level[m] = 1 + max((level[d] for d in graph[m]), default=-1)
    return [sorted(m for m, l in level.items() if l == f) for f in range(max(level.values()) + 1)]


def test_function_level_imports_are_seen(tmp_path):
    "The parser counts imports inside functions and every spelling of an intra-package import."
    (tmp_path/'a.py').write_text('from .b import x\n')
    (tmp_path/'b.py').write_text('def f():\n    from sidclip_guide.c import y\n')
    (tmp_path/'c.py').write_text('def g():\n    import sidclip_guide.a\n    from sidclip_guide import b\n')
    g = import_graph(tmp_path)
    assert g == {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'b'}}
    cyc = find_cycle(g)
    assert cyc and cyc[0] == cyc[-1] and set(cyc) <= {'a', 'b', 'c'}


def test_no_import_cycles():
    "No module of the package imports (even lazily, inside a function) one that imports it back."
    g = import_graph()
    cyc = find_cycle(g)
    assert cyc is None, 'import cycle: ' + ' -> '.join(cyc) + ' (move the shared helper down to the lower module)'


def test_modules_stand_on_floors():
    "The module graph is acyclic, so it has a floor plan: the foundations at the bottom, the CLI on top."
    g = import_graph()
    plan = floors(g)
    print('\n'.join(f'floor {i}: {", ".join(f)}' for i, f in enumerate(plan)))
    where = {m: i for i, f in enumerate(plan) for m in f}
    assert all(where[d] < where[m] for m, ds in g.items() for d in ds)   # every import points down
    assert where['utils'] == 0 and where['distill'] > max(where[m] for m in ('engine', 'build', 'checkpoints', 'student'))
    assert where['serve'] < where['deploy'] and where['models'] < where['student'] < where['distill']
