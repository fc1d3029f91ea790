"""Run notebooks and store the outputs that teach, so the docs site shows them: figures, tables, printed results.

nbdev renders the docs from the notebooks as committed; a notebook without outputs gives a site without a single
plot. This executes each notebook the way `nbdev_test` does (same working folder, cells flagged `gpu`/`weights` or
`eval: false` skipped and their stored outputs left alone) and keeps, per cell:

- figures (`image/png`), HTML and Markdown (tables), and printed stdout;
- nothing that is noise: progress bars, stderr, warnings, errors, widget views (they cannot render on a static
  page), and any text that names a temporary path or a timing.

Run it after changing a notebook whose results the page shows, then `nbdev_clean`:

    python tools/render_outputs.py nbs/03_evaluate.ipynb nbs/10_distill.ipynb
    python tools/render_outputs.py --all
"""
import argparse, json, os, re, sys
from pathlib import Path

from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.process import NBProcessor
from nbdev.frontmatter import FrontmatterProc

ROOT = Path(__file__).resolve().parents[1]
SKIP_FLAGS = {'gpu', 'weights'}
NOISE = re.compile(r'/tmp/|/var/folders/|\bit/s\]|s/it\]|\d+%\||\b\d+(\.\d+)? ?(s|ms|sec|seconds)\b(?! ?[±(])|took \d')
RICH = ('image/png', 'image/svg+xml', 'text/html', 'text/markdown')


def teaches(out: dict) -> bool:
    "Whether an output is worth showing on the docs site."
    t = out.get('output_type')
    if t == 'stream': return out.get('name') == 'stdout' and not NOISE.search(''.join(out.get('text', '')))
    if t not in ('display_data', 'execute_result'): return False
    data = out.get('data', {})
    if 'application/vnd.jupyter.widget-view+json' in data: return False          # a live widget: nothing to show on a static page
    if any(k in data for k in RICH): return True
    return 'text/plain' in data and not NOISE.search(''.join(data['text/plain'])) and 'widget' not in ''.join(data['text/plain']).lower()


def _skipped(cell) -> bool:
    if cell.cell_type != 'code': return True
    d = getattr(cell, 'directives_', {}) or {}
    return d.get('eval:', [''])[0].lower() == 'false' or bool(SKIP_FLAGS & d.keys())


def render(path: Path) -> int:
    "Execute `path` and write the outputs that teach into it; returns how many cells now show something."
    os.environ['IN_TEST'] = '1'
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
    sh = CaptureShell(path)
    with working_directory(path.parent): sh.run_all(nb, exc_stop=True, preproc=_skipped)
    outs = {c.get('id'): [o for o in c.get('outputs', []) if teaches(o)] for c in nb.cells if c.cell_type == 'code' and not _skipped(c)}
    raw = json.loads(path.read_text())
    shown = 0
    for c in raw['cells']:
        if c['cell_type'] != 'code' or c.get('id') not in outs: continue
        hidden = re.match(r'\s*#\|\s*hide\b', ''.join(c['source']))
        c['outputs'] = [] if hidden else [{k: v for k, v in o.items() if k != 'execution_count'} | ({'execution_count': None} if o['output_type'] == 'execute_result' else {})
                                         for o in outs[c['id']]]
        shown += bool(c['outputs'])
    path.write_text(json.dumps(raw, indent=1, ensure_ascii=False) + '\n')
    return shown


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('notebooks', nargs='*', help='notebooks to render')
    p.add_argument('--all', action='store_true', help='every notebook in nbs/')
    a = p.parse_args(argv)
    paths = sorted((ROOT/'nbs').glob('*.ipynb')) if a.all else [Path(n).resolve() for n in a.notebooks]
    if not paths: p.error('name notebooks, or pass --all')
    os.environ.setdefault('MPLBACKEND', 'Agg')
    for path in paths: print(f'{path.name}: {render(path)} cells with outputs', flush=True)


if __name__ == '__main__':
    main()
