"""SIDCLIP's "+S" on real photos: distil on the shots plus hundreds of extra images per class that the teacher labels.

    python benchmarks/bench_transfer_real.py --classes 20 --reuse benchmarks/results/fewshot_cub20.json   # CPU; a rerun continues
    python benchmarks/bench_transfer_real.py --classes 20 --shots 1 --sets in near out --curve 5 10 20       # one k, every set, Figure 3
    python benchmarks/bench_transfer_real.py --classes 20 --variant T=1.0                                     # a default changed, on every set

Data: `../shared/data/cub100-birds/` (train/<class>/*.jpg, test/<class>/*.jpg), the task's first `--classes` species.
Models as in `bench_fewshot_real.py`: teacher ImageNet EfficientNet-Lite2 with the library's head fitted on the k shots,
student ImageNet EfficientNet-Lite0 with its probe head, `distill.train` at its defaults. The transfer sets, each passed
to the library as `build_distill_dataset(split, k, unlabelled=[...])` (label -1: the teacher labels them, KD term only):

- in     in-domain: the rest of the task's training photos, labels dropped (~28 per class): the stand-in for ideal
         synthetic images
- near   near-domain: the training photos of the next `--classes` species (other birds), as many as `in` holds
- out    out-of-domain: `../shared/data/cifar10-photos` (32-px photos of planes, cars, animals), as many as `in` holds
- in@N   `--curve N`: the in-domain set capped at N photos per class (SIDCLIP's Figure 3 on real photos)

Rows, mean ± std over seeds, student training samples in brackets: teacher, frozen probe, plain KD and library on the
shots alone (`--reuse FILE` takes these from a `bench_fewshot_real.py` result of the same splits after checking that
the teacher's top-1 is the same to the last digit), then `library + <set>`.
"""
from __future__ import annotations
import argparse, json, random, sys, time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO/'benchmarks'))
from sidclip_guide.utils import SidclipError, atomic_write_text, stable_seed
from sidclip_guide.data import load_dataset, make_fewshot_split, ImageListDataset, eval_transform
from sidclip_guide.evaluate import linear_probe
from sidclip_guide.student import lite_image_encoder, timm_student
from sidclip_guide.teacher import Teacher
from sidclip_guide.transfer import list_images
from sidclip_guide.distill import DistillConfig, train, build_distill_dataset, evaluate_top1
from bench_fewshot_real import load_data, frozen_features, run_cell, table, _top1

BASE = ('teacher', 'frozen probe', 'plain KD', 'library')   # the shots-only rows


def split_k(a) -> int:
    "The k of the drawn split: 8 or the largest --shots, so that every run's k-shot sets are the same nested draws."
    return max(8, *a.shots)


def out_photos(folder, seed: int, n: int) -> list:
    "The out-of-domain set: n photos of `folder` (searched recursively), a seeded choice, sorted."
    files = list_images(folder)
    return sorted(random.Random(stable_seed(seed, 'out')).sample(files, min(n, len(files))))


def curve_photos(pool, split, n: int) -> list:
    "The first n photos of each class that are not among the split's drawn shots, in a seeded order: nested across n (and k)."
    drawn = {str(p) for p, _ in split.shots(split.k)}
    by_class = {}
    for p, y in pool.items: by_class.setdefault(y, []).append(p)
    return [p for y, ps in sorted(by_class.items())
            for p in sorted([q for q in ps if str(q) not in drawn], key=lambda q: stable_seed(split.seed, 'curve', q.name))[:n]]


def transfer_sets(a, pool, split, k: int) -> dict:
    "Set name -> list of image paths (unlabelled): in, near and out (as many as `in` at this k), and the in@N caps of the curve."
    n_in = len(pool.items) - len(split.shots(k))
    sets = {'in': [p for p, _ in pool.items]}          # shots among them are dropped by the library (same bytes)
    if 'near' in a.sets:
        near, _ = load_data(Path(a.data), 2 * len(pool.class_names))
        sets['near'] = [p for p, y in near.items if y >= len(pool.class_names)][:n_in]
    if 'out' in a.sets: sets['out'] = out_photos(a.out_domain, split.seed, n_in)
    for n in a.curve: sets[f'in@{n}'] = curve_photos(pool, split, n)   # the split is drawn at split_k: the curve's sets nest across k
    return sets


def base_rows(a, pool, test, feats, k, seed, reuse) -> list[dict]:
    "The shots-only rows: from `reuse` where it holds this cell (teacher top-1 checked), else trained here."
    split = make_fewshot_split(pool, k=split_k(a), seed=seed, test_info=test)
    old = [r for r in reuse if r['k'] == k and r['seed'] == seed and r['method'] in BASE]
    if len(old) == len(BASE):
        tpool, tte = feats['teacher']
        pos = {str(p): i for i, p in enumerate(feats['pool_paths'])}
        shots = split.shots(k); si = torch.tensor([pos[str(p)] for p, _ in shots])
        probe = linear_probe(tpool[si], torch.tensor([y for _, y in shots]), seed=seed, n_classes=len(split.class_names))
        t1 = _top1(probe.predict_logits(tte), torch.tensor([y for _, y in split.test_items()]))
        t_old = next(r['top1'] for r in old if r['method'] == 'teacher')
        if abs(t1 - t_old) > 1e-9: raise SidclipError(f"--reuse: the teacher's top-1 at k={k} seed={seed} is {t1} here, {t_old} in the file: another split; drop --reuse.")
        return [dict(r, reused=True) for r in old]
    rows = run_cell(argparse.Namespace(**{**vars(a), 'methods': ['plain', 'library']}), pool, test, feats, k, seed, [])
    return [r for r in rows if r['method'] in BASE]


def transfer_row(a, pool, test, feats, k, seed, name, paths, variant, label) -> dict:
    "Train the library's defaults (with `variant`) on the k shots plus `paths`; one row."
    split = make_fewshot_split(pool, k=split_k(a), seed=seed, test_info=test)
    shots = split.shots(k)
    teacher = Teacher.from_encoder(feats['teacher_enc'], split.class_names, shots, seed=seed)   # the same head fit as the teacher row
    cfg = DistillConfig(image_size=a.image_size, seed=seed, device='cpu', progress=False, **variant)
    t0 = time.time()
    ds = build_distill_dataset(split, k, transform=cfg.transform(), unlabelled=[paths] if paths else (), teacher=teacher, seed=seed,
                               min_confidence=cfg.images_min_confidence, refit_teacher=cfg.images_refit_teacher)
    t_top1 = _top1(teacher.logits_from_embeds(feats['teacher'][1]), torch.tensor([y for _, y in split.test_items()]))   # after the refit, if any
    st = timm_student(class_names=split.class_names, encoder=lite_image_encoder('lite0', a.image_size))
    r = train(st, teacher, ds, cfg)
    test_ds = ImageListDataset(split.test_items(), eval_transform(a.image_size))
    return dict(k=k, seed=seed, method=label, top1=evaluate_top1(r.student, test_ds, 64), samples=sum(h['samples'] for h in r.history),
                seconds=round(time.time() - t0, 1), transfer=ds.record['transfer'], set=name, teacher_top1=t_top1,
                teacher_refit=ds.record['teacher_refit'])


def teacher_row(r: dict) -> dict | None:
    "The teacher a transfer row distilled from, as a row of its own, where its head was refitted on the set."
    if not r.get('teacher_refit', {}).get('refit'): return None
    return dict(k=r['k'], seed=r['seed'], method=r['method'].replace('library', 'teacher', 1), top1=r['teacher_top1'], samples=0, seconds=0.0)


def _typed(kv: str) -> dict:
    "'T=1.0,mixup=1' -> DistillConfig field values of the fields' types."
    d, out = DistillConfig(), {}
    for x in filter(None, kv.split(',')):
        f, v = x.split('=', 1); cur = getattr(d, f)
        out[f] = v.lower() in ('1', 'true', 'yes') if isinstance(cur, bool) else None if v == 'None' else type(cur)(v) if cur is not None else int(v)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=str(REPO.parent/'shared'/'data'/'cub100-birds'), help='ImageFolder root with train/ and test/')
    p.add_argument('--out-domain', default=str(REPO.parent/'shared'/'data'/'cifar10-photos'), help="the 'out' set's folder")
    p.add_argument('--classes', type=int, default=20, help='the task: the first N species (near: the next N)')
    p.add_argument('--shots', type=int, nargs='+', default=[1, 2, 4, 8])
    p.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    p.add_argument('--sets', nargs='+', default=['in'], choices=['in', 'near', 'out'], help='transfer sets to train with')
    p.add_argument('--curve', type=int, nargs='*', default=[], help='in-domain photos per class for the Figure 3 curve, e.g. 5 10 20')
    p.add_argument('--variant', default='', help="DistillConfig fields changed for every transfer row, e.g. 'T=1.0' or 'mixup=1.0'")
    p.add_argument('--image-size', type=int, default=160); p.add_argument('--teacher-size', type=int, default=192)
    p.add_argument('--reuse', default=None, help='a bench_fewshot_real.py result with the same splits: its shots-only rows are used')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default=None, help='results JSON (a .md table beside it); a rerun continues row by row')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    pool, test = load_data(Path(a.data), a.classes)
    if test is None: raise SidclipError(f"{a.data} has no train/ and test/ folders: this benchmark needs a held-out test folder.")
    feats = frozen_features(pool, test, a.image_size, a.teacher_size)
    reuse = json.loads(Path(a.reuse).read_text())['rows'] if a.reuse else []
    out = Path(a.out) if a.out else None
    prior = json.loads(out.read_text()) if out and out.exists() else {'rows': [], 'meta': {}}
    rows, t_start = prior['rows'], t_start - prior['meta'].get('wall_s', 0)
    variant = _typed(a.variant)
    def have(k, seed, method): return any(r['k'] == k and r['seed'] == seed and r['method'] == method for r in rows)
    def add(new):
        rows.extend(new)
        for r in new: print(f"k={r['k']} seed={r['seed']} {r['method']}: {100 * r['top1']:.1f} ({r['samples']} samples, {r['seconds']} s)", flush=True)
        if out: save(out, a, pool, rows, time.time() - t_start)
    for seed in a.seeds:
        for k in a.shots:
            if not have(k, seed, 'library'): add(base_rows(a, pool, test, feats, k, seed, reuse))
            sets = transfer_sets(a, pool, make_fewshot_split(pool, k=split_k(a), seed=seed, test_info=test), k)
            for name in [*a.sets, *[f'in@{n}' for n in a.curve]]:
                label = f"library + {name}" + (f" ({a.variant})" if a.variant else '')
                if not have(k, seed, label):
                    r = transfer_row(a, pool, test, feats, k, seed, name, sets[name], variant, label)
                    add([r] + [t for t in [teacher_row(r)] if t])
    print(f"\ntop-1 % on {len(test.items)} test photos, mean ± std over seeds (student training samples):\n{table(rows, ks(rows))}\n\n"
          f"wall time {(time.time() - t_start) / 60:.1f} min")
    if out: save(out, a, pool, rows, time.time() - t_start)


def save(out: Path, a, pool, rows: list, wall: float) -> None:
    "The rows as JSON and the table as markdown beside it (atomic writes)."
    meta = dict(data=Path(a.data).name, classes=len(pool.class_names), shots=ks(rows), seeds=sorted({r['seed'] for r in rows}), image_size=a.image_size,
                teacher_size=a.teacher_size, wall_s=round(wall), threads=a.threads, defaults=DistillConfig().__dict__, reuse=a.reuse)
    atomic_write_text(out, json.dumps({'meta': meta, 'rows': rows}, indent=1))
    atomic_write_text(out.with_suffix('.md'), table(rows, ks(rows)) + '\n')


def ks(rows: list) -> list:
    "Every k the rows hold, in order: the table shows what the file holds, not just this invocation's --shots."
    return sorted({r['k'] for r in rows})


if __name__ == '__main__':
    main()
