"""The repository is consistent: library exported from the notebooks, notebooks clean, README generated."""
import json, re, shutil, subprocess, sys, filecmp
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
nbdev = pytest.importorskip('nbdev')

def _copy_project(tmp_path: Path) -> Path:
    dst = tmp_path/'proj'
    for name in ('settings.ini', 'setup.py'): shutil.copy(ROOT/name, dst/name if dst.exists() else (dst.mkdir() or dst/name))
    shutil.copytree(ROOT/'nbs', dst/'nbs')
    shutil.copytree(ROOT/'sidclip_guide', dst/'sidclip_guide', ignore=shutil.ignore_patterns('__pycache__'))
    return dst

def test_library_in_sync_with_notebooks(tmp_path):
    "nbdev_export in a copy of the project reproduces sidclip_guide/ byte for byte."
    proj = _copy_project(tmp_path)
    subprocess.run(['nbdev_export'], cwd=proj, check=True, capture_output=True)
    new = {p.relative_to(proj/'sidclip_guide') for p in (proj/'sidclip_guide').rglob('*.py')}
    old = {p.relative_to(ROOT/'sidclip_guide') for p in (ROOT/'sidclip_guide').rglob('*.py')}
    assert new == old, f'modules differ: only exported {new - old}, only committed {old - new}'
    stale = [str(p) for p in sorted(new) if not filecmp.cmp(proj/'sidclip_guide'/p, ROOT/'sidclip_guide'/p, shallow=False)]
    assert not stale, f'run nbdev_export: {stale} differ from the notebooks'

def test_notebooks_clean(tmp_path):
    "nbdev_clean changes no notebook (no outputs metadata noise, ids cleaned)."
    proj = _copy_project(tmp_path)
    subprocess.run(['nbdev_clean'], cwd=proj, check=True, capture_output=True)
    dirty = [p.name for p in sorted((ROOT/'nbs').glob('*.ipynb'))
             if (proj/'nbs'/p.name).read_bytes() != p.read_bytes()]
    assert not dirty, f'run nbdev_clean: {dirty} are not clean'

def test_readme_generated_from_index():
    "README.md is exactly what tools/readme.py renders from nbs/index.ipynb."
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_readme_commands_match_ci():
    "The README's test command is the command .ci/run runs."
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    cmd = 'pip install -e ".[dev]" && nbdev_test --n_workers 2 && pytest -q tests'
    assert cmd in readme and cmd in ci
    assert 'pip install -e . && sidclip demo' in readme

def test_library_imports_without_nbdev():
    "The runtime library needs neither nbdev nor fastcore (they are dev-only)."
    code = ("import sys, importlib\n"
            "for m in ('fastcore', 'nbdev', 'execnb'): sys.modules[m] = None\n"
            "import sidclip_guide._modidx as mi\n"
            "mods = sorted({v[1].split('/')[-1][:-3] for v in mi.d['syms'].values() for v in v.values()} | {'cli', '__main__'})\n"
            "for m in mods: importlib.import_module('sidclip_guide.' + m)\n"
            "print(len(mods))\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) >= 12

def test_sidebar_lists_every_notebook_once():
    "The hand-grouped docs sidebar (custom_sidebar = True) names every notebook exactly once, and nothing else."
    import yaml
    assert 'custom_sidebar = True' in (ROOT/'settings.ini').read_text()
    side = yaml.safe_load((ROOT/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents']
    listed = [p for sec in side for p in (sec['contents'] if isinstance(sec, dict) else [sec])]
    assert sorted(listed) == sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb')), listed
    assert len(listed) == len(set(listed))

def test_imports_have_their_own_cells():
    "nbdev's docs processing runs every cell with an import: such a cell must not also use names from cells it skips."
    import ast, json, re
    bad = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for i, c in enumerate(json.loads(nb.read_text())['cells']):
            s = ''.join(c['source'])
            if c['cell_type'] != 'code' or re.search(r'^\s*#\|\s*export', s, re.M): continue
            try: tree = ast.parse('\n'.join('pass' if l.lstrip().startswith(('%', '!')) else l for l in s.splitlines()))
            except SyntaxError: continue
            nodes = list(ast.walk(tree))
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes):
                bad.append(f'{nb.name} cell {i}: {s.splitlines()[0][:60]}')
    assert not bad, 'move these imports into their own cells:\n' + '\n'.join(bad)


def test_every_import_is_declared():
    "Each third-party module the library imports (at the top or inside a function) comes from a requirement in settings.ini: a user's `pip install sidclip-guide` has it."
    import ast, configparser, re
    from importlib.metadata import packages_distributions
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    norm = lambda s: re.sub(r'[-_.]+', '-', s).lower()
    declared = {norm(re.split(r'[<>=!~\[ ;]', r, 1)[0]) for key in ('requirements', 'deploy_requirements', 'lite_requirements')
                for r in cfg['DEFAULT'][key].split()}
    dists = {m: {norm(d) for d in ds} for m, ds in packages_distributions().items()}
    undeclared = {}
    for py in sorted((ROOT/'sidclip_guide').glob('*.py')):
        for node in ast.walk(ast.parse(py.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for top in {n.split('.')[0] for n in names}:
                if top in sys.stdlib_module_names or top in ('sidclip_guide', '__future__'): continue
                if not dists.get(top, set()) & declared: undeclared.setdefault(top, []).append(py.name)
    assert not undeclared, f"imported but not in settings.ini's requirements: {undeclared}"


def test_readme_links_to_the_docs_point_at_real_sections():
    """Every README link into the docs site names a notebook's page and one of its headings (Quarto's anchor rule:
    lower case, punctuation but `_-.` dropped, spaces to hyphens), so a renamed section breaks CI, not a reader's click."""
    import configparser
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    base = cfg['DEFAULT']['doc_host'] + cfg['DEFAULT']['doc_baseurl']
    links = re.findall(re.escape(base) + r'/([\w-]+)\.html#([^)\s]+)', (ROOT/'README.md').read_text(encoding='utf-8'))
    assert len(links) >= 10
    pages = {}
    for nb in (ROOT/'nbs').glob('[0-9][0-9]*_*.ipynb'):   # 10a_transfer too (nbdev drops '10a_' from the page name)
        heads = [l for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown'
                 for l in ''.join(c['source']).splitlines() if re.match(r'#{2,4} ', l)]
        pages[nb.stem.split('_', 1)[1]] = {re.sub(r'\s+', '-', re.sub(r'[^\w\s.-]', '', h.lstrip('#').strip().lower())) for h in heads}
    for page, anchor in links:
        assert page in pages, f'README links to {page}.html, which no notebook makes'
        assert anchor in pages[page], f'README links to {page}.html#{anchor}, a heading that does not exist'
