"""Tests of the Distill engine that a notebook cannot hold: exact resume, a 2-process run, the CLI as a
subprocess, pickle-free loading, bad input, and a real-behaviour check that KD from a stronger teacher
beats CE fine-tuning on held-out CIFAR-10 photos."""
import json, os, random, subprocess, sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is much faster than two contending

from sidclip_guide.utils import SidclipError, append_jsonl
from sidclip_guide.data import (make_toy_dataset, make_fewshot_split, save_split, ImageListDataset,
                                train_transform, eval_transform)
from sidclip_guide.models import TINY_CLIP, load_clip, ImageEncoder, encode_texts
from sidclip_guide.student import StudentConfig, build_student, TINY_STUDENT, Student, timm_student
from sidclip_guide.teacher import Teacher, TeacherCache
from sidclip_guide.distill import (DistillConfig, train, build_distill_dataset, load_checkpoint, save_checkpoint,
                                   read_checkpoint_manifest, read_metrics, synthetic_items, evaluate_top1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / 'shared'
CIFAR = SHARED / 'data' / 'cifar10-photos'


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('toy')
    split = make_fewshot_split(make_toy_dataset(tmp / 'data', n_classes=3, n_per_class=12), k=4, seed=0)
    save_split(split, tmp / 'split.json')
    bundle = load_clip(TINY_CLIP)
    return tmp, split, bundle


def _teacher(bundle, names, split):
    t = Teacher(ImageEncoder.from_open_clip(bundle), encode_texts(bundle, [f'A photo of {c}.' for c in names]), names)
    t.fit_head(ImageListDataset(split.shots(4), eval_transform(32)), epochs=20)
    return t


def _student(names, seed=0, **kw):
    torch.manual_seed(seed)
    return build_student(StudentConfig(TINY_STUDENT, **kw), names)


def _cfg(out, **kw):
    return DistillConfig(**{**dict(loss='kd', epochs=2, min_steps=0, batch_size=8, lr=3e-3, image_size=32, device='cpu',
                                   out_dir=str(out), progress=False), **kw})


def test_resume_equals_uninterrupted_and_teacher_frozen(toy):
    tmp, split, bundle = toy
    names = split.class_names
    teacher = _teacher(bundle, names, split)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ds = build_distill_dataset(split, 4, transform=train_transform(32))          # RandAugment on: seeds must replay
    straight = train(_student(names), teacher, ds, _cfg(tmp / 'a'))
    train(_student(names), teacher, ds, _cfg(tmp / 'b'), stop_after=1)            # the session "dies" after epoch 1
    resumed = train(_student(names, seed=99), teacher, ds, _cfg(tmp / 'b'), resume=True)
    assert [r['epoch'] for r in resumed.history] == [2]
    sa, sb = straight.student.state_dict(), resumed.student.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa: assert torch.equal(sa[k], sb[k]), k
    # optimizer state too: both final checkpoints hold identical tensors
    from safetensors.torch import load_file
    ta, tb = load_file(str(tmp / 'a/checkpoints/ckpt-0002.safetensors')), load_file(str(tmp / 'b/checkpoints/ckpt-0002.safetensors'))
    for k in ta:
        if k.startswith(('model/', 'optim/')): assert torch.equal(ta[k], tb[k]), k
    # the frozen teacher never moved and stayed in eval mode
    for k, v in teacher.state_dict().items(): assert torch.equal(v, before[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert [r['epoch'] for r in read_metrics(tmp / 'b/metrics.jsonl')] == [1, 2]


def test_checkpoint_loads_without_pickle_and_rejects_other_architecture(toy, monkeypatch):
    tmp, split, bundle = toy
    names = split.class_names
    m = _student(names)
    p = save_checkpoint(tmp / 'ck', 1, m)
    def no_pickle(*a, **k): raise AssertionError('torch.load must never be called on a checkpoint')
    monkeypatch.setattr(torch, 'load', no_pickle)
    m2 = _student(names, seed=5)
    load_checkpoint(p, m2)
    for k, v in m.state_dict().items(): assert torch.equal(v, m2.state_dict()[k])
    with pytest.raises(SidclipError, match='shape mismatches'):
        load_checkpoint(p, _student(names[:2]))                                    # another class list
    with pytest.raises(SidclipError, match='missing keys'):
        load_checkpoint(tmp / 'ck', _student(names, proj_dim=16))                  # an extra projection
    assert read_checkpoint_manifest(tmp / 'ck')['latest']['epoch'] == 1


def test_bad_input(toy):
    tmp, split, bundle = toy
    names = split.class_names
    teacher = _teacher(bundle, names, split)
    ds = build_distill_dataset(split, 4, transform=eval_transform(32))
    with pytest.raises(SidclipError, match=r'outside \[0, 1\]'): train(_student(names), teacher, ds, _cfg(None, alpha=1.2))
    with pytest.raises(SidclipError, match='must be > 0'): train(_student(names), teacher, ds, _cfg(None, T=0))
    with pytest.raises(SidclipError, match='differ'):
        train(_student(names[::-1]), teacher, ds, _cfg(None))
    with pytest.raises(SidclipError, match='empty'): build_distill_dataset(split, 0)
    syn = tmp / 'syn'; syn.mkdir(exist_ok=True)
    append_jsonl(syn / 'manifest.jsonl', dict(file='nope.png', class_name=names[0], item_id='a', seed=0, generator='noise'))
    with pytest.raises(SidclipError, match='missing'): build_distill_dataset(split, 4, syn / 'manifest.jsonl')
    with pytest.raises(SidclipError, match='needs a teacher'): train(_student(names), None, ds, _cfg(None))


def test_cli(toy, capsys):
    "`sidclip distill` in-process (the subprocess path is covered by the 2-process test): outputs, exit codes, messages."
    from sidclip_guide.cli import main
    tmp, split, bundle = toy
    out = tmp / 'cli'
    assert main(['distill', '--tiny', '--split', str(tmp / 'split.json'), '--out', str(out), '--epochs', '1', '--quiet',
                         '--no-randaugment', '--no-teacher-cache', '--loss', 'kd']) == 0
    assert (out / 'student.safetensors').exists() and (out / 'metrics.png').exists() and (out / 'metrics.csv').exists()
    assert read_checkpoint_manifest(out / 'checkpoints')['latest']['epoch'] == 1
    assert main(['distill', '--tiny', '--split', str(tmp / 'split.json'), '--out', str(tmp / 'x'), '--T', '0']) == 2
    assert 'T=0' in capsys.readouterr().err
    assert main(['distill', '--split', str(tmp / 'nope.json'), '--out', str(tmp / 'y')]) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_two_processes(toy):
    """torchrun with 2 CPU processes (gloo): DDP training works, shards the data and writes one checkpoint per epoch.
    The same two processes run KD (SIDCLIP), then L2+CLIP (Popp: the teacher's texts classify the projection, DDP with
    find_unused_parameters; the captions gathered from both processes), then the image contrastive loss (its learnable τ
    in the student's forward pass, so DDP averages its gradient); `train` compares the processes' weight checksums every epoch, so a gradient that DDP did
    not average fails here."""
    tmp, split, bundle = toy
    runs = {'kd': (tmp / 'mp-kd', 2), 'l2+clip': (tmp / 'mp-l2clip', 1), 'contrastive': (tmp / 'mp-contrastive', 1)}
    script = tmp / 'two_runs.py'
    args = {loss: ['--tiny', '--split', str(tmp / 'split.json'), '--out', str(out), '--epochs', str(ep), '--loss', loss, '--quiet']
            for loss, (out, ep) in runs.items()}
    script.write_text(f"""import sys, runpy
from sidclip_guide.cli import main
sys.argv = ['sidclip', 'distill', *{args['kd']!r}]
try: runpy.run_module('sidclip_guide', run_name='__main__')    # `python -m sidclip_guide distill ...`
except SystemExit as e: assert e.code == 0, e.code
assert main(['distill', *{args['l2+clip']!r}]) == 0
assert main(['distill', *{args['contrastive']!r}]) == 0
""")
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(29500 + os.getpid() % 1000),
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for loss, (out, epochs) in runs.items():
        rows = read_metrics(out / 'metrics.jsonl')
        assert [x['processes'] for x in rows] == [2] * epochs, loss
        assert rows[0]['samples'] >= 12                                  # both shards counted (padded to even batches)
        assert read_checkpoint_manifest(out / 'checkpoints')['latest']['epoch'] == epochs
    assert {'l2', 'aux'} <= set(read_metrics(runs['l2+clip'][0] / 'metrics.jsonl')[0])
    assert r.stdout.count('distill:') == 3                                 # only the main process reports, once per run
    assert r.stdout.count('train: 2 process(es) on cpu') == 3              # the world size is said at the start of each run


@pytest.mark.skipif(not CIFAR.is_dir(), reason='needs ../shared/data/cifar10-photos')
def test_kd_from_stronger_teacher_beats_ce_on_heldout_cifar():
    """Teacher: ImageNet EfficientNet-Lite0 (from the installed wheel) + a linear head fitted on 1,000 labelled photos.
    Student: a small CNN from scratch. CE sees the 10 labelled shots per class; KD sees the same shots plus 900
    unlabelled photos labelled only by the teacher. On 500 held-out photos KD must clearly win."""
    from sidclip_guide.student import lite0_image_encoder
    names = sorted(p.name for p in CIFAR.iterdir() if p.is_dir())
    per = {c: sorted((CIFAR / c).glob('*.jpg')) for c in names}
    rng = random.Random(0)
    for c in names: rng.shuffle(per[c])
    shots = [(p, y) for y, c in enumerate(names) for p in per[c][:10]]
    unlabelled = [(p, y) for y, c in enumerate(names) for p in per[c][10:100]]
    test = ImageListDataset([(p, y) for y, c in enumerate(names) for p in per[c][150:200]], eval_transform(32))
    enc = lite0_image_encoder(64)
    teacher = Teacher(enc, torch.zeros(len(names), enc.embed_dim), names, logit_scale=20.0)
    teacher.fit_head(ImageListDataset(shots + unlabelled, eval_transform(32)), epochs=300, lr=1e-2)

    def student():
        torch.manual_seed(0)
        def blk(i, o): return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        net = nn.Sequential(*blk(3, 24), nn.MaxPool2d(2), *blk(24, 48), nn.MaxPool2d(2), *blk(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Student(ImageEncoder.from_module(net, 96, 32), names, cosine_head=False, logit_scale=1.0)

    # a from-scratch student: BatchNorm statistics must train (bn='train'); one rate, no warm-up, as this test always used
    base = DistillConfig(epochs=8, min_steps=0, batch_size=64, lr=3e-3, head_lr_mult=1.0, warmup=0.0, bn='train', head_init='keep',
                         image_size=32, device='cpu', progress=False, eval_every=100, seed=0)
    kd_ds = ImageListDataset(shots + [(p, -1) for p, _ in unlabelled], eval_transform(32))
    kd = train(student(), teacher, kd_ds, replace(base, loss='kd', alpha=1.0, aug_pool=1),
               test_ds=test, teacher_cache=TeacherCache(teacher))
    ce = train(student(), None, ImageListDataset(shots, train_transform(32, randaugment=False)),
               replace(base, loss='ce', epochs=48), test_ds=test)                         # ~ the same number of steps
    t_acc, kd_acc, ce_acc = evaluate_top1(teacher, test), kd.history[-1]['test_top1'], ce.history[-1]['test_top1']
    print(f'teacher {t_acc:.3f}  KD student {kd_acc:.3f}  CE student {ce_acc:.3f}')
    assert t_acc > kd_acc > ce_acc + 0.04, (t_acc, kd_acc, ce_acc)


def test_fewshot_mechanisms_in_a_real_run(toy):
    "Frozen BN stays frozen through `train`, the LP-initialised head starts at the probe, the default cache hits, a changed config refuses to resume."
    from sidclip_guide.distill import probe_head, step_budget
    tmp, split, bundle = toy
    names = split.class_names
    teacher = _teacher(bundle, names, split)
    ds = build_distill_dataset(split, 4, transform=train_transform(32))
    torch.manual_seed(0)
    st = timm_student('tinynet_e', names, image_size=32)
    bn0 = {k: v.clone() for k, v in st.state_dict().items() if 'running_' in k}
    cfg = DistillConfig(epochs=1, min_steps=40, batch_size=8, image_size=32, device='cpu', progress=False, out_dir=str(tmp / 'fs'))
    r = train(st, teacher, ds, cfg)
    assert len(r.history) == step_budget(2, 1, 40)[0] == 20                                 # 12 shots, batch 8: 2 steps a pass
    for k, v in st.state_dict().items():
        if k in bn0: assert torch.equal(v, bn0[k]), k                                      # bn='frozen': ImageNet statistics kept
    assert r.teacher_cache is not None and r.teacher_cache.hits > 0 and r.teacher_cache.misses == 12 * cfg.aug_pool
    probe = json.loads((tmp / 'fs' / 'config.json').read_text())['probe']
    assert probe['n'] == 12
    with pytest.raises(SidclipError, match=rf'lr: {cfg.lr} -> 0.002'):
        train(timm_student('tinynet_e', names, image_size=32), teacher, ds, replace(cfg, lr=2e-3, epochs=2), resume=True)


def test_probe_head_matches_frozen_probe_accuracy(toy):
    "LP-FT's starting point: right after `probe_head`, the student classifies like the linear probe on its frozen features."
    from sidclip_guide.distill import probe_head
    from sidclip_guide.evaluate import extract_features, linear_probe
    tmp, split, bundle = toy
    torch.manual_seed(0)
    st = timm_student('tinynet_e', split.class_names, image_size=32)
    shots = ImageListDataset(split.shots(4), eval_transform(32))
    probe_head(st, shots)
    x, y = extract_features(st.image_encoder, shots, progress=False)
    ref = linear_probe(x, y, n_classes=len(split.class_names))
    test = ImageListDataset(split.test_items(), eval_transform(32))
    xt, yt = extract_features(st.image_encoder, test, progress=False)
    st.eval()
    assert torch.equal((xt @ ref.weight.T).argmax(-1), torch.cat([st(xb)['logits'].argmax(-1) for xb, _ in torch.utils.data.DataLoader(test, 64)]))


def test_cli_timm_teacher_from_local_weights(toy, capsys):
    "`sidclip distill --teacher timm:NAME --teacher-pretrained FILE`: any timm network, its head fitted on the shots; a wrong file stops it."
    import timm
    from safetensors.torch import save_file
    from sidclip_guide.cli import main
    tmp, split, bundle = toy
    torch.manual_seed(0)
    w = tmp / 'teacher.safetensors'
    save_file({k: v.contiguous() for k, v in timm.create_model('tinynet_e', num_classes=0).state_dict().items()}, str(w))
    args = ['--split', str(tmp / 'split.json'), '--teacher', f'timm:tinynet_e', '--teacher-pretrained', str(w), '--init', 'none',
            '--timm-name', 'tinynet_e', '--image-size', '32', '--epochs', '1', '--min-steps', '0', '--batch-size', '8', '--quiet',
            '--device', 'cpu']
    assert main(['distill', *args, '--out', str(tmp / 'timm')]) == 0
    assert (tmp / 'timm' / 'student.safetensors').exists()
    wrong = tmp / 'wrong.safetensors'
    save_file({'x': torch.zeros(3)}, str(wrong))
    assert main(['distill', *args[:5], str(wrong), *args[6:], '--out', str(tmp / 'timm2')]) == 2
    assert 'does not fit' in capsys.readouterr().err


def test_resume_skips_a_truncated_checkpoint_and_manifest(toy, capsys):
    "A crash that truncates the newest checkpoint and the manifest: resume says so and continues from the one before."
    from sidclip_guide.distill import load_student, save_student
    tmp, split, bundle = toy
    names = split.class_names
    teacher = _teacher(bundle, names, split)
    ds = build_distill_dataset(split, 4, transform=train_transform(32))
    out = tmp / 'trunc'
    train(_student(names), teacher, ds, _cfg(out, epochs=3, save_every=1, keep=3), stop_after=2)
    ck = out / 'checkpoints'
    newest = ck / 'ckpt-0002.safetensors'
    newest.write_bytes(newest.read_bytes()[:100])                    # killed mid-write of a non-atomic copy, or a bad disk
    (ck / 'manifest.json').write_text('{"format": ')                  # and the manifest too
    (ck / '.ckpt-0003.safetensors.abc.tmp').write_bytes(b'half')      # an orphan of a killed atomic write
    r = train(_student(names, seed=5), teacher, ds, _cfg(out, epochs=3, save_every=1, keep=3), resume=True)
    said = capsys.readouterr().out
    assert 'ckpt-0002.safetensors cannot be read' in said and 'Resumed from ckpt-0001.safetensors' in said
    assert [h['epoch'] for h in r.history] == [2, 3]
    assert [json.loads(l)['epoch'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]   # epoch 2 once, not twice
    assert not list(ck.glob('.*.tmp'))                                   # orphans are swept by the next checkpoint write
    assert read_checkpoint_manifest(ck)['latest']['epoch'] == 3
    # a truncated student file is a one-line error naming it, not a traceback
    spec = dict(clip_name=TINY_STUDENT, timm_name='tinynet_e', teacher_dim=None, category='object', init='text', loss='kd', image_size=32)
    save_student(r.student, out, spec)
    (out / 'student.safetensors').write_bytes(b'\x00' * 10)
    with pytest.raises(SidclipError, match='student.safetensors is unreadable'): load_student(out)


@pytest.mark.parametrize('loss', ['clip', 'mp', 'contrastive'])
def test_contrastive_losses_train_alone(toy, loss):
    "Popp's CLIP, multi-positive and image contrastive losses on their own (no L2; the first two without a teacher forward): one tiny epoch from the CLI, the term logged by name."
    from sidclip_guide.cli import main
    tmp, split, bundle = toy
    out = tmp / f'alone-{loss}'
    assert main(['distill', '--tiny', '--split', str(tmp / 'split.json'), '--out', str(out), '--epochs', '1', '--loss', loss, '--quiet']) == 0
    row = read_metrics(out / 'metrics.jsonl')[0]
    assert loss in row and 'l2' not in row and row['loss'] == pytest.approx(row[loss])
    if loss == 'mp':             # with --recipe popp the anchors are the teacher's text embeddings of Popp's caption, and they stay fixed
        out = tmp / 'alone-mp-popp'
        assert main(['distill', '--tiny', '--split', str(tmp / 'split.json'), '--out', str(out), '--epochs', '1', '--loss', 'mp', '--recipe', 'popp', '--quiet']) == 0
        from sidclip_guide.distill import load_student
        from sidclip_guide.student import head_prompts
        torch.manual_seed(0); tb = load_clip(TINY_CLIP)          # the run's tiny teacher: build_teacher seeds its random weights with the run's seed
        want = F.normalize(encode_texts(tb, head_prompts(split.class_names, 'popp', split.category)), dim=-1)
        assert torch.allclose(F.normalize(load_student(out).head.weight, dim=-1), want, atol=1e-4)
        assert head_prompts(['x'], 'popp', 'bird') == ['a photo of a x, which is a type of bird.']
    if loss == 'contrastive':    # the learnable τ is logged, saved with the student and comes back with it
        assert 0 < row['tau'] < 1
        from sidclip_guide.distill import load_student
        assert load_student(out).contrastive_tau is not None


def test_cli_rerun_after_a_truncated_checkpoint_equals_uninterrupted(tmp_path, capsys):
    """A run stopped after its first checkpoint (as a kill -9 there leaves it), rerun (it continues), then its newest checkpoint
    truncated to half and the same command again: the fallback to the one before is named, and every file ends as in an
    uninterrupted run: the weights, and metrics.jsonl and metrics.csv with each epoch once."""
    import csv
    from safetensors.torch import load_file
    from sidclip_guide.cli import main
    cmd = ['distill', '--tiny', '--seed', '1', '--epochs', '2', '--quiet']
    ref, out = tmp_path / 'ref', tmp_path / 'run'
    assert main([*cmd, '--out', str(ref)]) == 0
    assert main([*cmd, '--out', str(out), '--stop-after', '1']) == 0
    assert main([*cmd, '--out', str(out)]) == 0
    ck = out / 'checkpoints' / 'ckpt-0002.safetensors'
    ck.write_bytes(ck.read_bytes()[:ck.stat().st_size // 2])
    capsys.readouterr()
    assert main([*cmd, '--out', str(out)]) == 0
    assert 'Resumed from ckpt-0001.safetensors' in capsys.readouterr().out
    a, b = load_file(str(ref / 'student.safetensors')), load_file(str(out / 'student.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {'seconds', 'samples_per_s'}
    def rows(run):
        jl = [{k: v for k, v in json.loads(l).items() if k not in timing} for l in (run / 'metrics.jsonl').read_text().splitlines()]
        cs = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader((run / 'metrics.csv').open())]
        return jl, cs
    (jl, cs), (ref_jl, ref_cs) = rows(out), rows(ref)
    assert [r['epoch'] for r in jl] == [1, 2] and [r['epoch'] for r in cs] == ['1', '2']
    assert jl == ref_jl and cs == ref_cs
