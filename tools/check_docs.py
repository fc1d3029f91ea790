"""Run nbdev 2's docs pre-processing (what `nbdev_docs` runs before Quarto) on every notebook; exit 1 on any failure.

nbdev executes every cell that imports something (and every exported cell) to render the API pages, so a test cell
that mixes imports with code using names from cells nbdev skips breaks the site. Keep imports in their own cells.
`nbdev_proc_nbs` would also try to install Quarto (impossible offline) and reinstall the package; this runs only
the processing step, `nbdev.serve.proc_nbs`, into `_proc/`.

    python tools/check_docs.py [N_WORKERS]
"""
import sys
from pathlib import Path
from nbdev.serve import proc_nbs

def main(n_workers: int = 1) -> int:
    cache = Path(proc_nbs(n_workers=n_workers, force=True))
    want = {p.name for p in Path('nbs').glob('*.ipynb')}
    got = {p.name for p in cache.glob('*.ipynb')}
    if want - got:
        print(f'docs pre-processing produced no page for {sorted(want - got)}', file=sys.stderr); return 1
    print(f'docs pre-processing: {len(got)} notebooks OK -> {cache}')
    return 0

if __name__ == '__main__':
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
