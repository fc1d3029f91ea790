"Probes: corruptions (determinism, severity, errors), the spurious-feature property, transfer matrix, `sidclip probe` and the demo stage."
import argparse, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from sidclip_guide.utils import SidclipError, append_jsonl
from sidclip_guide.teacher import clip_teacher
from sidclip_guide.probes import (CORRUPTIONS, SHAPE_SETS, corrupt, corruption_robustness, robustness_summary, plot_robustness,
                                  shapes_probe_sets, spurious_reliance, feature_reliance, fit_classifier, load_tensors,
                                  ColourStats, SmallCNN, transfer_matrix,
                                  synthetic_halves, _logits)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('shapes')
    return shapes_probe_sets(tmp / 'train', 4, 40, 32, seed=0), shapes_probe_sets(tmp / 'probe', 4, 40, 32, seed=1)


@pytest.fixture(scope='module')
def imgs(shapes):
    return load_tensors(shapes[1]['coloured'])[0][:16]


# --- corruptions ---------------------------------------------------------------------------------------------

def test_corrupt_deterministic_and_in_range(imgs):
    state = np.random.get_state()
    for kind in CORRUPTIONS:
        for sev in (1, 5):
            a, b = corrupt(imgs, kind, sev, seed=3), corrupt(imgs, kind, sev, seed=3)
            assert torch.equal(a, b), kind
            assert a.shape == imgs.shape and a.dtype == imgs.dtype and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(np.random.get_state()[1], state[1])       # numpy's global generator is restored
    for kind in ('gaussian_noise', 'shot_noise', 'impulse_noise', 'frost', 'snow'):
        assert not torch.equal(corrupt(imgs, kind, 3, seed=1), corrupt(imgs, kind, 3, seed=2)), kind
    assert torch.equal(corrupt(imgs, 'contrast', 2, seed=1), corrupt(imgs, 'contrast', 2, seed=99))   # deterministic kinds ignore the seed
    assert corrupt(imgs[0], 'jpeg_compression', 4).shape == imgs[0].shape                             # single image in, single image out


def test_corrupt_is_the_reference_code(imgs):
    "Exactly what `imagecorruptions.corrupt` gives on the uint8 image (same numpy seed): the literature's corruptions."
    from imagecorruptions import corrupt as reference
    from sidclip_guide.utils import stable_seed
    u8 = (imgs[:2] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for kind in ('gaussian_noise', 'contrast', 'motion_blur', 'jpeg_compression'):
        ours = corrupt(imgs[:2], kind, 3, seed=7)
        for i in range(2):
            np.random.seed(stable_seed(7, kind, 3, i) % 2**32)
            ref = np.asarray(reference(u8[i], corruption_name=kind, severity=3), np.float32) / 255
            np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), ref, atol=1e-6, err_msg=kind)


def test_corrupt_severity_grows(imgs):
    for kind in ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'contrast', 'jpeg_compression', 'fog'):
        d = [(corrupt(imgs, kind, s, seed=0) - imgs).abs().mean().item() for s in (1, 3, 5)]
        assert d[0] <= d[1] + 1e-6 <= d[2] + 2e-6 and d[2] > d[0], (kind, d)


def test_corrupt_bad_input(imgs):
    with pytest.raises(SidclipError, match="close: \\['fog'\\]"): corrupt(imgs, 'fogg', 1)
    for bad in (0, 6, 2.5, True, '3'):
        with pytest.raises(SidclipError, match='1, 2, 3, 4 or 5'): corrupt(imgs, 'contrast', bad)
    with pytest.raises(SidclipError, match='float images'): corrupt((imgs * 255).byte(), 'contrast', 1)
    with pytest.raises(SidclipError, match='float images'): corrupt(torch.rand(2, 1, 8, 8), 'contrast', 1)
    with pytest.raises(SidclipError, match='at least 32x32'): corrupt(torch.rand(2, 3, 16, 16), 'contrast', 1)
    with pytest.raises(SidclipError, match='float images'): corrupt(np.zeros((3, 8, 8), np.float32), 'contrast', 1)


# --- spurious features -----------------------------------------------------------------------------------------

def test_shapes_sets(shapes, tmp_path):
    train, probe = shapes
    assert list(train) == list(SHAPE_SETS)
    for s in SHAPE_SETS: assert train[s].class_names == ['circle', 'cross', 'square', 'triangle'] and len(train[s]) == 160
    again = shapes_probe_sets(tmp_path / 'again', 4, 40, 32, seed=0)               # deterministic, atomic files
    a, b = train['shuffled'].items[7][0], again['shuffled'].items[7][0]
    assert a.read_bytes() == b.read_bytes()
    assert not list((tmp_path / 'again').rglob('*.tmp'))
    with pytest.raises(SidclipError, match='n_classes'): shapes_probe_sets(tmp_path / 'x', n_classes=1)
    with pytest.raises(SidclipError, match='n_per_class'): shapes_probe_sets(tmp_path / 'x', n_per_class=0)


def test_spurious_reliance_separates_colour_and_shape_models(shapes):
    train, probe = shapes
    torch.manual_seed(0); colour = fit_classifier(ColourStats(4), train['coloured'], steps=300)
    torch.manual_seed(0); shape = fit_classifier(SmallCNN(4), train['shuffled'], steps=600)
    rc, rs = spurious_reliance(colour, probe), spurious_reliance(shape, probe)
    assert rc['coloured'] > 0.9 and rc['shuffled'] < 0.45, rc            # reads colour: chance (0.25) once colour is shuffled
    assert rs['coloured'] > 0.8 and rs['shuffled'] > 0.8, rs              # reads shape: keeps accuracy on both
    assert rc['colour_drop'] > 0.5 and abs(rs['colour_drop']) < 0.15
    assert rc['colour_drop'] == pytest.approx(rc['coloured'] - rc['shuffled'])
    assert rc['background_drop'] == pytest.approx(rc['coloured'] - rc['unicolour_bg'])
    with pytest.raises(SidclipError, match='missing'): spurious_reliance(colour, {'coloured': probe['coloured']})


def test_feature_reliance_on_colour_features(shapes):
    class ColourFeats(nn.Module):
        def forward(self, x): return {'embeds': torch.cat([x.mean((2, 3)), x.amax((2, 3)), x.amin((2, 3))], 1)}
    r = feature_reliance(ColourFeats(), shapes[1])
    assert r['coloured'] > 0.9 and r['shuffled'] < 0.45 and r['colour_drop'] > 0.45, r


# --- transfer and robustness tables ----------------------------------------------------------------------------

class Const(nn.Module):
    "Always predicts class `c` (of 2)."
    def __init__(self, c): super().__init__(); self.c = c; self.p = nn.Parameter(torch.zeros(1))
    def forward(self, x): return {'logits': torch.nn.functional.one_hot(torch.full((len(x),), self.c), 2).float() + self.p}

class Labelled(torch.utils.data.Dataset):
    def __init__(self, labels): self.labels = labels
    def __len__(self): return len(self.labels)
    def __getitem__(self, i): return torch.full((3, 32, 32), 0.5), self.labels[i]   # ImageNet-C needs >= 32 px


def test_transfer_matrix_known_case():
    m = transfer_matrix({'A': Const(0), 'B': Const(1)}, {'real': Labelled([0, 0, 0, 1]), 'synthetic': Labelled([1, 1])}, batch_size=3)
    assert m.shape == (2, 2) and list(m.index) == ['A', 'B'] and list(m.columns) == ['real', 'synthetic']
    assert m.index.name == 'trained on' and m.columns.name == 'evaluated on'
    np.testing.assert_allclose(m.values, [[0.75, 0.0], [0.25, 1.0]])
    with pytest.raises(SidclipError, match='at least one'): transfer_matrix({}, {'real': Labelled([0])})
    with pytest.raises(SidclipError, match='logits'): _logits(nn.Identity(), torch.rand(2, 3, 4, 4))


def test_corruption_robustness_table(tmp_path):
    df = corruption_robustness(Const(0), Labelled([0, 0, 1, 0]), kinds=('gaussian_noise', 'jpeg_compression'), severities=(1, 5), batch_size=3)
    assert list(df.columns) == ['kind', 'severity', 'top1'] and len(df) == 5
    assert df.iloc[0].tolist() == ['clean', 0, 0.75] and (df.top1 == 0.75).all()
    s = robustness_summary(df)
    assert s == pytest.approx({'clean': 0.75, 'mean_corruption_acc': 0.75, 'relative_drop': 0.0}) and df.attrs['clean'] == 0.75
    with pytest.raises(SidclipError, match='Unknown corruption'): corruption_robustness(Const(0), Labelled([0]), kinds=('snowfall',))
    with pytest.raises(SidclipError, match='severity'): corruption_robustness(Const(0), Labelled([0]), severities=(7,))
    plot_robustness(pd.concat([df.assign(model='a'), df.assign(model='b')]), tmp_path / 'r.png')
    assert (tmp_path / 'r.png').stat().st_size > 1000


def test_synthetic_halves():
    fit, held = synthetic_halves([(f'{i}', i % 2) for i in range(6)])
    assert [y for _, y in fit] == [0, 1, 0, 1] and [y for _, y in held] == [0, 1]


# --- CLI and demo ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    from sidclip_guide.data import make_toy_dataset, make_fewshot_split, save_split, toy_image
    from sidclip_guide.utils import atomic_save_image
    tmp = tmp_path_factory.mktemp('toy')
    info = make_toy_dataset(tmp / 'toy', n_classes=3, n_per_class=8)
    split = make_fewshot_split(info, k=2, seed=0)
    save_split(split, tmp / 'split.json')
    syn = tmp / 'syn'
    for y, name in enumerate(split.class_names):
        colour, shape = name.split(' ')
        for i in range(4):
            f = f'{y}/{i}.png'; atomic_save_image(toy_image(colour, shape, 32, 1000 + i), syn / f)
            append_jsonl(syn / 'manifest.jsonl', dict(item_id=f'{y}-{i}', file=f, class_name=name, seed=i, generator='toy'))
    return tmp, split


def _parse(argv):
    from sidclip_guide.cli import build_parser
    return build_parser('probe').parse_args(['probe', *argv])


def test_cli_tiny_run(toy, capsys):
    from sidclip_guide.models import TINY_CLIP
    tmp, split = toy
    out = tmp / 'probe'
    args = _parse(['--split', str(tmp / 'split.json'), '--model', TINY_CLIP, '--out', str(out), '--manifest', str(tmp / 'syn' / 'manifest.jsonl'),
                   '--corruptions', 'gaussian_noise,contrast', '--severities', '1,5', '--head-epochs', '10'])
    assert args.func(args) == 0
    assert 'mean corruption acc' in capsys.readouterr().out
    for f in ('results.csv', 'results.md', 'probe_robustness.png'): assert (out / f).is_file(), f
    df = pd.read_csv(out / 'results.csv')
    assert set(df.probe) == {'corruption', 'shapes', 'transfer'}
    assert set(df[df.probe == 'corruption'].setting) >= {'clean', 'gaussian_noise@1', 'contrast@5', 'summary'}
    assert len(df[df.probe == 'transfer']) == 4 and df.value[df.metric == 'top1'].between(0, 1).all()
    # an independent synthetic test set (Popp Table 3; a sketch set is the same flag): the synthetic head then fits on every synthetic image
    args = _parse(['--split', str(tmp / 'split.json'), '--model', TINY_CLIP, '--out', str(tmp / 'probe2'), '--manifest', str(tmp / 'syn'),
                   '--test-set', f"synthetic (independent)={tmp / 'syn'}", '--corruptions', 'contrast', '--head-epochs', '5'])
    assert args.func(args) == 0
    df = pd.read_csv(tmp / 'probe2' / 'results.csv'); tr = df[df.probe == 'transfer']
    assert set(tr.setting) == {'eval on real test', 'eval on synthetic (independent)'} and set(tr.model) == {'head on real shots', 'head on synthetic'}


def test_cli_bad_input(toy, capsys):
    from sidclip_guide.models import TINY_CLIP
    tmp, _ = toy
    base = ['--split', str(tmp / 'split.json'), '--model', TINY_CLIP, '--out', str(tmp / 'bad')]
    for extra, msg in [(['--corruptions', 'fogg'], 'Unknown corruption'), (['--severities', '0'], '1, 2, 3, 4 or 5'),
                       (['--model', 'ViT-Nope-14'], 'Unknown CLIP model'),
                       (['--manifest', str(tmp / 'none.jsonl')], 'does not exist'), (['--test-set', str(tmp / 'syn')], 'takes NAME=MANIFEST')]:
        args = _parse(base + extra)
        with pytest.raises(SidclipError, match=msg): args.func(args)
    args = _parse(['--split', str(tmp / 'missing.json'), '--model', TINY_CLIP, '--out', str(tmp / 'bad')])
    with pytest.raises(SidclipError, match='does not exist'): args.func(args)
    with pytest.raises(SystemExit): _parse(base + ['--severities', 'a,b'])      # argparse's one-line usage error
    assert "'a,b' is not a comma-separated list of int" in capsys.readouterr().err
