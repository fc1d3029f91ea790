"""The teacher's head refitted on transfer photos (`transfer.refit_teacher_head`), on frozen features of real photos, across domains.

    python benchmarks/bench_refit_real.py                                   # CPU: ~25 min for the features (cached), then ~5 min
    python benchmarks/bench_refit_real.py --shots 1 --tasks cub1-20 cifar10  # a part
    python benchmarks/bench_refit_real.py --tasks cub1-20 --shots 1 --curve 5 10 20 --out benchmarks/results/refit_curve_cub20.json   # Fig. 3

A student distilled on the shots plus transfer photos copies its teacher; this measures the teacher itself, before any
student trains: top-1 of the head fitted on the k shots (the teacher of every shots-only row), of the head that
`refit_teacher_head` makes from the shots plus a transfer set (class-balanced self-training, run only when the set
passes the `in_domain` test), and of the same refit forced on every set (`min_in_domain=0`, to show what the test
guards against). Teacher: ImageNet EfficientNet-Lite2 at 192 px (`lite_image_encoder('lite2')`), the stand-in of
`bench_fewshot_real.py`; its frozen, L2-normalised features are computed once and cached (`--cache`).

Tasks and their transfer sets (k-shot splits as in the other real-photo benchmarks: `make_fewshot_split`, k = 8 drawn, nested):
- cub1-20     species 1-20 of `../shared/data/cub100-birds`, tested on their test/ photos; in: the rest of their training
              photos (labels dropped), near: the training photos of species 21-40, out: cifar10-photos (as many as in)
- cub51-100   species 51-100; in: the rest of their training photos, near: the training photos of species 1-25
- cub1-100    all 100 species; in
- cifar10     `../shared/data/cifar10-photos` (one folder): the photos that are not shots, split in two halves by a seeded
              draw: in (labels dropped) and the test photos
"""
from __future__ import annotations
import argparse, json, os, random, sys, time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO/'benchmarks'))
from sidclip_guide.utils import atomic_write_text, stable_seed
from sidclip_guide.data import DatasetInfo, load_dataset, make_fewshot_split, ImageListDataset, eval_transform
from sidclip_guide.evaluate import extract_features, linear_probe
from sidclip_guide.student import lite_image_encoder
from sidclip_guide.transfer import in_domain, self_train_probe
from bench_transfer_real import out_photos, curve_photos

DATA = REPO.parent/'shared'/'data'
TASKS = {'cub1-20': (0, 20, ('in', 'near', 'out')), 'cub51-100': (50, 50, ('in', 'near')), 'cub1-100': (0, 100, ('in',)), 'cifar10': None}


_STORE = {}   # cache file -> its dict, loaded once


def features(paths: list, cache: Path, size: int) -> torch.Tensor:
    "(N, D) normalised Lite2 features of `paths`, computed once per file and kept in `cache` (a torch file path -> feature)."
    store = _STORE.setdefault(cache, torch.load(cache) if cache.exists() else {})
    todo = [p for p in dict.fromkeys(map(os.path.normpath, paths)) if p not in store]
    if todo:
        enc = lite_image_encoder('lite2', size)
        x, _ = extract_features(enc, ImageListDataset([(p, 0) for p in todo], eval_transform(size)), 64, 'cpu', progress=False)
        store.update(zip(todo, x)); tmp = cache.with_suffix('.tmp'); torch.save(store, tmp); tmp.replace(cache)
    return torch.stack([store[os.path.normpath(p)] for p in paths])


def cub_info(first: int, n: int, part: str) -> DatasetInfo:
    "Species first+1 .. first+n of cub100 (labels from 0)."
    info = load_dataset('imagefolder', DATA/'cub100-birds', part)
    return DatasetInfo([(p, y - first) for p, y in info.items if first <= y < first + n], info.class_names[first:first + n], 'bird', info.root)


def task_sets(task: str, k: int, seed: int, curve=()) -> tuple:
    "(shots, test items, {set name: paths}) of one task, k and seed; `curve`: in@N sets, the first N in-domain photos of each class."
    if task == 'cifar10':
        split = make_fewshot_split(load_dataset('imagefolder', DATA/'cifar10-photos'), k=8, seed=seed)
        rest = split.test_items(); random.Random(stable_seed(seed, 'halves')).shuffle(rest)
        return split.shots(k), rest[1::2], {'in': [p for p, _ in rest[::2]]}
    first, n, names = TASKS[task]
    pool = cub_info(first, n, 'train')
    split = make_fewshot_split(pool, k=8, seed=seed, test_info=cub_info(first, n, 'test'))
    shots = split.shots(k); taken = {str(p) for p, _ in shots}
    sets = {'in': [p for p, _ in pool.items if str(p) not in taken]}
    for N in curve: sets[f'in@{N}'] = curve_photos(pool, split, N)   # the student benchmark's Fig. 3 sets
    if 'near' in names: sets['near'] = [p for p, _ in cub_info(first + n if first == 0 else 0, n if first == 0 else 25, 'train').items][:len(sets['in'])]
    if 'out' in names: sets['out'] = out_photos(DATA/'cifar10-photos', seed, len(sets['in']))
    return shots, split.test_items(), sets


def cell(task: str, k: int, seed: int, cache: Path, size: int, min_in: float, curve=()) -> list[dict]:
    "Rows for one task, k and seed: the shots' head, and per set the refit as the library runs it and forced."
    shots, test, sets = task_sets(task, k, seed, curve)
    sx, sy = features([p for p, _ in shots], cache, size), torch.tensor([y for _, y in shots])
    tx, ty = features([p for p, _ in test], cache, size), torch.tensor([y for _, y in test])
    p0 = linear_probe(sx, sy, seed=seed, n_classes=int(ty.max()) + 1)
    def top1(p): return float((p.predict_logits(tx).argmax(-1) == ty).float().mean())
    rows = [dict(task=task, k=k, seed=seed, method='teacher (shots)', top1=top1(p0))]
    for name, paths in sets.items():
        ux = features(paths, cache, size); frac = in_domain(sx, sy, ux)
        forced = top1(self_train_probe(sx, sy, ux, p0.predict_logits(ux), seed))
        rows += [dict(task=task, k=k, seed=seed, method=f'teacher + {name}', top1=forced if frac >= min_in else rows[0]['top1'],
                      in_domain=frac, refit=frac >= min_in, photos=len(paths)),
                 dict(task=task, k=k, seed=seed, method=f'teacher + {name}, forced', top1=forced, in_domain=frac, refit=True, photos=len(paths))]
    return rows


def table(rows: list[dict]) -> str:
    "Markdown: one row per task and method, one column per k, 'mean ± std' (and the mean in_domain fraction, refits/seeds)."
    import pandas as pd
    df, ks = pd.DataFrame(rows), sorted({r['k'] for r in rows})
    out = ['| task | teacher | ' + ' | '.join(f'k = {k}' for k in ks) + ' |', '|---|---|' + '---|' * len(ks)]
    for (task, m), d in df.groupby(['task', 'method'], sort=False):
        cells = []
        for k in ks:
            e = d[d.k == k]
            if e.empty: cells.append(''); continue
            s = f"{100 * e.top1.mean():.1f} ± {100 * e.top1.std(ddof=0):.1f}"
            if 'in_domain' in e and e.in_domain.notna().all() and 'forced' not in m: s += f" ({e.in_domain.mean():.2f}, {int(e.refit.sum())}/{len(e)})"
            cells.append(s)
        out.append(f'| {task} | {m} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    p.add_argument('--shots', type=int, nargs='+', default=[1, 2, 4, 8])
    p.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    p.add_argument('--size', type=int, default=192, help="the teacher's input size")
    p.add_argument('--curve', type=int, nargs='*', default=[], help='in-domain photos per class for SIDCLIP Fig. 3 (cub tasks), e.g. 5 10 20')
    p.add_argument('--min-in-domain', type=float, default=None, help="refit_teacher_head's threshold (default: the library's)")
    p.add_argument('--cache', default=str(Path.home()/'.cache'/'sidclip-guide'/'lite2_192_features.pt'), help='feature cache (image path -> feature), outside the repo')
    p.add_argument('--out', default=str(REPO/'benchmarks'/'results'/'refit_real.json'))
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    import inspect
    from sidclip_guide.transfer import refit_teacher_head
    min_in = a.min_in_domain if a.min_in_domain is not None else inspect.signature(refit_teacher_head).parameters['min_in_domain'].default
    t0, rows = time.time(), []
    Path(a.cache).parent.mkdir(parents=True, exist_ok=True)
    for task in a.tasks:
        for k in a.shots:
            for seed in a.seeds:
                rows += cell(task, k, seed, Path(a.cache), a.size, min_in, a.curve if task != 'cifar10' else ())
            print(f'{task} k={k}: ' + ', '.join(f"{r['method']} {100 * r['top1']:.1f}" for r in rows if r['task'] == task and r['k'] == k and r['seed'] == a.seeds[-1]), flush=True)
    md = table(rows)
    print(f"\nteacher top-1 % on each task's test photos, mean ± std over seeds (mean in_domain fraction, refits/seeds); "
          f"threshold {min_in}:\n{md}\n\nwall time {(time.time() - t0) / 60:.1f} min")
    out = Path(a.out)
    atomic_write_text(out, json.dumps({'meta': dict(tasks=a.tasks, shots=a.shots, seeds=a.seeds, size=a.size, min_in_domain=min_in,
                                                    wall_s=round(time.time() - t0)), 'rows': rows}, indent=1))
    atomic_write_text(out.with_suffix('.md'), md + '\n')


if __name__ == '__main__':
    main()
