"""Training throughput of `sidclip_guide.distill.train` vs a naive fp32 PyTorch loop (same teacher, student, data).

    python benchmarks/bench_distill.py            # --quick on CPU (< 2 min): lite0@128 teacher, tiny student
    python benchmarks/bench_distill.py --device cuda   # ViT-L/14 teacher (random weights) -> EfficientNet-B0 student at 224

Prints samples/s in the steady state (epochs after the first, when the teacher cache is warm) and ratios:
  naive       plain loop: fp32, NCHW, no cache, pageable memory, loss.item() every step
  engine      train(): same fp32 maths through accelerate (overhead check)
  +cl         channels_last (NHWC; CUDA and CPU)
  +bf16       torch.autocast bf16 (CUDA only)
  +cache      TeacherCache keyed by (image, augmentation seed), aug_pool=1: teacher paid once per image
  student     student-only training (loss='ce', no teacher) with the same settings: the floor
Targets: engine(+all) / naive >= 1.2x on CPU, >= 2x on GPU; student / (+cache) <= 1.5x.
"""
import argparse, math, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidclip_guide.distill import DistillConfig, train
from sidclip_guide.losses import kd_loss
from sidclip_guide.teacher import Teacher, TeacherCache


class MemImages(Dataset):
    "N random uint8 images held in memory -> ([0,1] float, label): decoding is not what we measure."
    def __init__(self, n, size, n_classes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, n_classes, (n,), generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i].float() / 255, int(self.y[i])


def build(device, quick):
    names = [f'class {i}' for i in range(10)]
    if device == 'cpu':
        from sidclip_guide.student import lite0_image_encoder, StudentConfig, build_student, TINY_STUDENT
        enc = lite0_image_encoder(128)
        teacher = Teacher(enc, F.normalize(torch.randn(10, enc.embed_dim), dim=-1), names)
        make_student = lambda: (torch.manual_seed(0), build_student(StudentConfig(TINY_STUDENT), names))[1]
        data = MemImages(256 if quick else 1024, 64, 10)
        return teacher, make_student, data, 32, 3
    from sidclip_guide.models import load_clip, ImageEncoder
    from sidclip_guide.student import StudentConfig, build_student, STUDENT_CLIP
    bundle = load_clip('ViT-L-14', None, device='cpu')                      # the SIDCLIP teacher's architecture, random weights
    enc = ImageEncoder.from_open_clip(bundle)
    teacher = Teacher(enc, F.normalize(torch.randn(10, enc.embed_dim), dim=-1), names)
    make_student = lambda: (torch.manual_seed(0), build_student(StudentConfig(STUDENT_CLIP), names))[1]
    data = MemImages(1024 if quick else 4096, 224, 10)
    return teacher, make_student, data, 128, 3


def naive(teacher, student, data, bs, epochs, device, workers):
    "The loop one writes first: fp32, NCHW, no cache, pageable memory, a sync per step for logging."
    teacher.to(device).eval(); student.to(device).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    dl = DataLoader(data, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True)
    speeds = []
    for e in range(epochs):
        if device == 'cuda': torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for x, y in dl:
            x, y = x.to(device), y.to(device)
            with torch.no_grad(): t = teacher(x)
            s = student(x)
            loss = kd_loss(s['logits'], t['logits'], y, alpha=0.5, T=4.0)['loss']
            opt.zero_grad(); loss.backward(); opt.step()
            loss.item(); n += len(y)
        if device == 'cuda': torch.cuda.synchronize()
        speeds.append(n / (time.perf_counter() - t0))
    return steady(speeds)


def steady(speeds): return sum(speeds[1:]) / len(speeds[1:]) if len(speeds) > 1 else speeds[0]


def engine(teacher, student, data, cfg, cache=None):
    res = train(student, teacher if cfg.loss != 'ce' else None, data, cfg, teacher_cache=cache)
    if cfg.device == 'cuda': torch.cuda.synchronize()
    return steady([r['samples_per_s'] for r in res.history])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--quick', action='store_true', default=None, help='small sizes (default on CPU)')
    ap.add_argument('--full', action='store_true', help='larger data set')
    ap.add_argument('--workers', type=int, default=None, help='DataLoader workers (default 0 on CPU, 4 on CUDA)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default 1 on CPU: the shared dev box)')
    a = ap.parse_args(argv)
    quick = not a.full
    workers = a.workers if a.workers is not None else (0 if a.device == 'cpu' else 4)
    if a.device == 'cpu': torch.set_num_threads(a.threads or 1)
    teacher, make_student, data, bs, epochs = build(a.device, quick)
    base = DistillConfig(loss='kd', epochs=epochs, min_steps=0, batch_size=bs, lr=1e-3, head_lr_mult=1.0, warmup=0.0, bn='train',
                         head_init='keep', alpha=0.5, device=a.device, progress=False, num_workers=workers,
                         amp='no', channels_last=False, randaugment=False, aug_pool=1)      # the naive loop's maths
    rows = []
    t0 = time.perf_counter()
    rows.append(('naive fp32 loop', naive(teacher, make_student(), data, bs, epochs, a.device, workers)))
    rows.append(('engine fp32', engine(teacher, make_student(), data, base)))
    cfg = replace(base, channels_last=True); rows.append(('+ channels_last', engine(teacher, make_student(), data, cfg)))
    if a.device == 'cuda':
        cfg = replace(cfg, amp='bf16'); rows.append(('+ bf16 autocast', engine(teacher, make_student(), data, cfg)))
    rows.append(('+ teacher cache', engine(teacher, make_student(), data, cfg, TeacherCache(teacher))))
    rows.append(('student only (no teacher)', engine(teacher, make_student(), data, replace(cfg, loss='ce'))))
    naive_s, full_s, floor = rows[0][1], rows[-2][1], rows[-1][1]
    dev = torch.cuda.get_device_name() if a.device == 'cuda' else f'CPU, {torch.get_num_threads()} thread(s)'
    print(f'\nbench_distill on {dev}: {len(data)} images, batch {bs}, {epochs} epochs, steady state = epochs 2..{epochs}')
    print(f"{'variant':<28}{'samples/s':>12}{'vs naive':>10}{'vs previous':>13}")
    prev = None
    for name, v in rows:
        print(f"{name:<28}{v:>12.1f}{v / naive_s:>9.2f}x" + (f"{v / prev:>12.2f}x" if prev else f"{'':>13}"))
        prev = v
    target = 2.0 if a.device == 'cuda' else 1.2
    print(f"\nengine (all optimisations) / naive: {full_s / naive_s:.2f}x (target >= {target}x)  "
          f"student-only / engine+cache: {floor / full_s:.2f}x (target <= 1.5x)   [{time.perf_counter() - t0:.0f}s]")
    return rows


if __name__ == '__main__':
    main()
