"Synthesize (issue #3, part 1): mixing, schedules, the tiny diffusers generators, bad images, offline failures."
import json, random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidclip_guide.utils import SidclipError, stable_seed
from sidclip_guide.synthesize import (
    MixSpec, PromptSpec, GenRequest, Generator, MixSchedule, KandinskyConfig, SDXLConfig, cond_from_dict,
    validate_weights, paper_weights, draw_mix_specs, mix_embeddings, mix_similarities, renormalize,
    is_bad_image, reseed_request, generate_checked, max_pixel_diff, offline_clip_tokenizer,
    tiny_kandinsky_generator, tiny_sdxl_lcm_generator, load_kandinsky, load_sdxl_lcm, weight_mixer_widget)

SHARED = Path(__file__).resolve().parents[2] / 'shared'
CIFAR = SHARED / 'data' / 'cifar10-photos'


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)   # tiny models on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def shots(tmp_path_factory):
    root = tmp_path_factory.mktemp('shots')
    rng = np.random.default_rng(0)
    for c in ('daisy', 'rose'):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f'{i}.jpg')
    return root


@pytest.fixture(scope='module')
def kg(shots): return tiny_kandinsky_generator(root=shots)


@pytest.fixture(scope='module')
def sg(): return tiny_sdxl_lcm_generator()


# ---- contract -------------------------------------------------------------------------------------------------
def test_contract_roundtrip_json():
    for c in (MixSpec('daisy', ['a.jpg', 'b.jpg'], [0.2, 0.4, 0.4], text='a daisy'), PromptSpec('daisy', 'a (daisy)1.5', 'blurry')):
        r = GenRequest('daisy-00001', c, 5)
        assert GenRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r
        assert cond_from_dict(c.to_dict()) == c
    with pytest.raises(SidclipError, match='Unknown conditioning kind'): cond_from_dict({'kind': 'x'})


# ---- weights and schedules --------------------------------------------------------------------------------------
@pytest.mark.parametrize('w,n,msg', [([-0.1, 0.6, 0.5], 3, 'negative'), ([0.3, 0.3, 0.3], 3, 'normalize=True'),
                                     ([0.5, 0.5], 3, '2 images'), ([0.4, 0.3, 0.2, 0.1], 3, '4 entries'),
                                     ([float('nan'), 1.0], 2, 'NaN'), ([0.0, 0.0], 2, 'sum to 0')])
def test_bad_weights(w, n, msg):
    with pytest.raises(SidclipError, match=msg): validate_weights(w, n)


def test_normalize_fixes_sum():
    assert validate_weights([2, 4, 4], 3, normalize=True) == pytest.approx([0.2, 0.4, 0.4])
    t, a, b = torch.randn(3, 16)
    assert torch.allclose(mix_embeddings(t, torch.stack([a, b]), [1, 2, 2], normalize=True), 0.2 * t + 0.4 * a + 0.4 * b, atol=1e-6)


def test_paper_schedule():
    assert paper_weights(0) == [1.0] and paper_weights(1) == [0.4, 0.6]
    assert all(paper_weights(k) == [0.2, 0.4, 0.4] for k in (2, 4, 16))
    assert MixSchedule(few_shot=[0.5, 0.5]).weights_for(8) == [0.5, 0.5]           # configurable: one image per sample


def test_draws_seeded_distinct_and_independent_of_n():
    paths = [f'daisy/{i}.jpg' for i in range(8)]
    a = draw_mix_specs('daisy', paths, 50, seed=3)
    assert a == draw_mix_specs('daisy', paths, 50, seed=3)
    assert a != draw_mix_specs('daisy', paths, 50, seed=4)
    assert a[:10] == draw_mix_specs('daisy', paths, 10, seed=3)                 # item i depends on (seed, class, i) only
    assert all(len(set(s.image_paths)) == 2 and set(s.image_paths) <= set(paths) for s in a)
    used = {p for s in a for p in s.image_paths}; assert len(used) == 8          # all shots get used
    assert draw_mix_specs('daisy', [], 3, 0) == [MixSpec('daisy', [], [1.0])] * 3
    assert {tuple(s.weights) for s in draw_mix_specs('daisy', paths[:1], 3, 0)} == {(0.4, 0.6)}
    with pytest.raises(SidclipError, match='duplicates'): draw_mix_specs('daisy', ['a', 'a'], 1, 0)


def test_renormalize_keeps_sum_and_proportions():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        w = [rng.random() for _ in range(n)]; s = sum(w); w = [x / s for x in w]
        i, v = rng.randrange(n), rng.uniform(-0.2, 1.2)
        r = renormalize(w, i, v)
        assert sum(r) == pytest.approx(1.0) and min(r) >= 0
        if n > 1:
            assert r[i] == pytest.approx(min(1, max(0, v)))
            others = [j for j in range(n) if j != i]
            if r[i] < 1:
                for j, k in zip(others, others[1:]):                      # pairwise ratios unchanged
                    assert r[j] * w[k] == pytest.approx(r[k] * w[j], abs=1e-9)


def test_mix_similarities():
    t, a = torch.tensor([1., 0, 0]), torch.tensor([0., 1, 0])
    s = mix_similarities(t, torch.stack([a]), [0.4, 0.6])
    assert s['text'] == pytest.approx(0.4 / (0.52 ** 0.5)) and s['images'][0] == pytest.approx(0.6 / (0.52 ** 0.5))


# ---- bad images ----------------------------------------------------------------------------------------------
def test_is_bad_image():
    assert is_bad_image(np.full((4, 4, 3), np.nan, np.float32)) == 'nan'
    assert is_bad_image(torch.full((3, 4, 4), float('inf'))) == 'nan'
    assert is_bad_image(Image.new('RGB', (16, 16))) == 'black'
    assert is_bad_image(np.full((4, 4, 3), 0.01, np.float32)) == 'black'
    assert is_bad_image(Image.new('RGB', (16, 16), (200, 10, 90))) == 'constant'
    assert is_bad_image(torch.full((3, 8, 8), 0.7)) == 'constant'
    img = np.zeros((16, 16, 3), np.uint8); img[8:] = 255
    assert is_bad_image(img) is None and is_bad_image(Image.fromarray(img)) is None


class _NaNOnce:
    "Returns a NaN image for the first seed it sees, then noise."
    name = 'nan-once'
    def __init__(self): self.bad_seed = None
    def settings(self): return {}
    def generate(self, reqs):
        out = []
        for r in reqs:
            if self.bad_seed is None: self.bad_seed = r.seed
            out.append(np.full((4, 4, 3), np.nan) if r.seed == self.bad_seed else
                       np.random.default_rng(r.seed).random((4, 4, 3)))
        return out


def test_generate_checked_reseeds_and_records():
    g = _NaNOnce(); req = GenRequest('x', PromptSpec('d', 'd'), 11)
    [(used, img, why)] = generate_checked(g, [req])
    assert why is None and used.seed == reseed_request(req, 1).seed != 11 and used.item_id == 'x'
    assert reseed_request(req, 1) == reseed_request(req, 1) and reseed_request(req, 1) != reseed_request(req, 2)


# ---- tokenizer / offline loading -------------------------------------------------------------------------------
def test_offline_tokenizer_matches_open_clip(tmp_path):
    import open_clip
    tok = offline_clip_tokenizer(tmp_path)
    text = ['a photo of a sunflower, in a field', 'Hôtel façade at night!']
    ours = tok(text, padding='max_length', max_length=77, return_tensors='pt').input_ids
    ref = open_clip.get_tokenizer('ViT-B-32')(text)
    for o, r in zip(ours, ref):
        n = int((r != 0).sum()); assert o[:n].tolist() == r[:n].tolist()
    assert (tmp_path / 'clip_tokenizer' / 'vocab.json').exists()


@pytest.mark.parametrize('var', ['HF_HUB_OFFLINE', 'SIDCLIP_OFFLINE'])
def test_offline_failures_name_model_and_fix(monkeypatch, var):
    "Either variable puts loading in local-files-only mode (the rule of `sidclip_guide.models.is_offline`)."
    for v in ('HF_HUB_OFFLINE', 'SIDCLIP_OFFLINE'): monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, '1')
    with pytest.raises(SidclipError, match='kandinsky-2-2-prior.*offline / local files only.*local-dir'): load_kandinsky(KandinskyConfig())
    with pytest.raises(SidclipError, match="prior_id='<folder>'"): load_kandinsky(KandinskyConfig(prior_id='/no/such/prior'))
    with pytest.raises(SidclipError, match='stable-diffusion-xl-base-1.0'): load_sdxl_lcm(SDXLConfig(lora_id=None))
    with pytest.raises(SidclipError, match='does not exist'): load_sdxl_lcm(SDXLConfig(lora_id=None, model_id='./missing/sdxl'))


# ---- tiny Kandinsky ---------------------------------------------------------------------------------------------
def _reqs(specs, base=0): return [GenRequest(f'{s.class_name}-{i:05d}', s, stable_seed(base, s.class_name, i)) for i, s in enumerate(specs)]


def test_kandinsky_end_to_end_sizes(shots):
    g = tiny_kandinsky_generator(image_size=48, root=shots)
    assert isinstance(g, Generator)
    specs = draw_mix_specs('daisy', [f'daisy/{i}.jpg' for i in range(4)], 2, 0) + draw_mix_specs('rose', ['rose/0.jpg'], 1, 0) \
        + draw_mix_specs('tulip', [], 1, 0)
    imgs = g.generate(_reqs(specs))
    assert [im.size for im in imgs] == [(48, 48)] * 4 and all(isinstance(im, Image.Image) for im in imgs)
    s = g.settings(); json.dumps(s)
    assert s['generator'] == 'kandinsky-2.2' and s['height'] == 48 and s['dtype'] == 'float32'


def test_kandinsky_mix_matches_hand_computation(kg, shots):
    spec = MixSpec('daisy', ['daisy/1.jpg', str(shots / 'daisy' / '3.jpg')], [0.2, 0.4, 0.4])   # relative and absolute paths
    req = GenRequest('d', spec, 42)
    t = kg.text_embeddings(['daisy'], [42])[0]
    a, b = kg.image_embedding('daisy/1.jpg'), kg.image_embedding(shots / 'daisy' / '3.jpg')
    assert torch.allclose(kg.mixed_embeddings([req])[0], 0.2 * t + 0.4 * a + 0.4 * b, atol=1e-5)
    # the same thing diffusers' interpolate computes (same seed for the text part)
    ref = kg.prior.interpolate(['daisy', Image.open(shots / 'daisy' / '1.jpg'), Image.open(shots / 'daisy' / '3.jpg')],
                               [0.2, 0.4, 0.4], num_inference_steps=kg.config.prior_steps,
                               generator=torch.Generator().manual_seed(42)).image_embeds[0]
    assert torch.allclose(kg.mixed_embeddings([req])[0], ref.float(), atol=1e-5)
    # text weight 0: pure image mix, no prior call needed
    pure = kg.mixed_embeddings([GenRequest('p', MixSpec('daisy', ['daisy/1.jpg'], [0.0, 1.0]), 1)])[0]
    assert torch.allclose(pure, a, atol=1e-6)


def test_kandinsky_batch_independence(kg, shots):
    specs = draw_mix_specs('daisy', [f'daisy/{i}.jpg' for i in range(4)], 3, 7)
    reqs = _reqs(specs, 7)
    batch = kg.generate(reqs)
    alone = [kg.generate([r])[0] for r in reqs]
    assert all(max_pixel_diff(x, y) <= 1 for x, y in zip(batch, alone))
    rev = kg.generate(reqs[::-1])[::-1]                                     # order within the batch does not matter
    assert all(max_pixel_diff(x, y) <= 1 for x, y in zip(batch, rev))
    assert [max_pixel_diff(x, y) for x, y in zip(batch, kg.generate(reqs))] == [0, 0, 0]


def test_kandinsky_bad_inputs(kg):
    with pytest.raises(SidclipError, match='not found'): kg.generate([GenRequest('x', MixSpec('daisy', ['nope.jpg'], [0.4, 0.6]), 0)])
    with pytest.raises(SidclipError, match='normalize=True'): kg.generate([GenRequest('x', MixSpec('daisy', ['daisy/0.jpg'], [0.5, 0.6]), 0)])
    with pytest.raises(SidclipError, match='1 text \\+ 1 images'): kg.generate([GenRequest('x', MixSpec('daisy', ['daisy/0.jpg'], [1.0]), 0)])
    assert kg.generate([]) == []
    [im] = kg.generate([GenRequest('p', PromptSpec('daisy', 'a photo of a daisy'), 0)])   # PromptSpec: text-only mix
    assert im.size == (32, 32)


def test_kandinsky_real_cifar_shots():
    if not CIFAR.is_dir(): pytest.skip(f'{CIFAR} not present')
    paths = sorted((CIFAR / 'cat').glob('*.jpg'))[:3]
    g = tiny_kandinsky_generator(root=CIFAR)
    specs = draw_mix_specs('cat', [str(p.relative_to(CIFAR)) for p in paths], 2, 0)
    imgs = g.generate(_reqs(specs))
    assert [is_bad_image(im) for im in imgs] == [None, None]
    sims = mix_similarities(g.text_embeddings(['cat'], [0])[0], torch.stack([g.image_embedding(p) for p in specs[0].image_paths]), [0.2, 0.4, 0.4])
    assert len(sims['images']) == 2 and all(-1 <= c <= 1 for c in sims['images'])


# ---- tiny SDXL + LCM ------------------------------------------------------------------------------------------------
def test_sdxl_end_to_end_and_batch_independence(sg):
    reqs = [GenRequest(f'p{i}', PromptSpec('daisy', p), 200 + i) for i, p in
            enumerate(['a photo of a (daisy)1.4', 'a (daisy)0.7 in snow', 'a daisy, ' + 'sharp focus, ' * 40])]
    batch = sg.generate(reqs)
    assert [im.size for im in batch] == [(32, 32)] * 3
    alone = [sg.generate([r])[0] for r in reqs]
    assert all(max_pixel_diff(x, y) <= 1 for x, y in zip(batch, alone))
    s = sg.settings(); json.dumps(s)
    assert s['steps'] == 6 and s['guidance_scale'] == 0.5 and s['scheduler'] == 'LCMScheduler'


def test_sdxl_guidance_uses_negative_prompt():
    g = tiny_sdxl_lcm_generator(steps=2)
    g.config.guidance_scale = 2.0
    kw = g.prompt_embeddings(PromptSpec('daisy', 'a daisy', 'blurry, (lowres)1.3'))
    assert {'negative_prompt_embeds', 'negative_pooled_prompt_embeds'} <= set(kw)
    a = g.generate([GenRequest('a', PromptSpec('daisy', 'a daisy', ''), 1)])[0]
    b = g.generate([GenRequest('a', PromptSpec('daisy', 'a daisy', 'blurry'), 1)])[0]
    assert max_pixel_diff(a, b) > 0


def test_sdxl_rejects_mixspec(sg):
    with pytest.raises(SidclipError, match='KandinskyGenerator'): sg.generate([GenRequest('x', MixSpec('d', [], [1.0]), 0)])


# ---- widget ---------------------------------------------------------------------------------------------------
def test_widget_sliders_and_preview(kg, shots):
    ui = weight_mixer_widget(kg, 'daisy', [shots / 'daisy' / f'{i}.jpg' for i in range(3)], seed=1)
    assert len(ui.sliders) == 4 and sum(ui.state['weights']) == pytest.approx(1)
    ui.sliders[2].value = 0.9
    assert sum(s.value for s in ui.sliders) == pytest.approx(1) and ui.sliders[2].value == pytest.approx(0.9)
    ui.button.click(); assert ui.image.value[:4] == b'\x89PNG'


# ---- GPU (runs only where CUDA is present) -------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('offload', [False, True])
def test_fp16_cuda_tiny(shots, offload):
    g = tiny_kandinsky_generator('cuda', dtype='fp16', cpu_offload=offload, root=shots)
    reqs = _reqs(draw_mix_specs('daisy', [f'daisy/{i}.jpg' for i in range(4)], 3, 0))
    imgs = g.generate(reqs)
    assert [is_bad_image(im) for im in imgs] == [None] * 3 and g.settings()['dtype'] == 'float16'
    alone = [g.generate([r])[0] for r in reqs]
    print('kandinsky fp16 cuda batch-vs-alone max diff', [max_pixel_diff(x, y) for x, y in zip(imgs, alone)])
    s = tiny_sdxl_lcm_generator('cuda', dtype='fp16', cpu_offload=offload)
    assert [is_bad_image(im) for im in s.generate([GenRequest('a', PromptSpec('d', 'a (daisy)1.2'), 1)])] == [None]


# ---- LCM-LoRA loading path (needs peft, diffusers' LoRA backend) -------------------------------------------------
def test_lcm_lora_loading_path(tmp_path):
    "A tiny LoRA saved with diffusers' own `save_lora_weights` goes through `load_lcm_lora` (local folder) and changes the images."
    pytest.importorskip('peft')
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from sidclip_guide.synthesize import _tiny_sdxl_pipe, load_lcm_lora, SDXLLCMGenerator
    src = _tiny_sdxl_pipe(0)
    src.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=['to_k', 'to_q', 'to_v', 'to_out.0']))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in src.unet.named_parameters():
            if 'lora_' in n: p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src.unet)))
    cfg = SDXLConfig(model_id='tiny-random', lora_id=None, steps=2, height=32, width=32, dtype='fp32', device='cpu')
    base = SDXLLCMGenerator(_tiny_sdxl_pipe(0), cfg)
    pipe = _tiny_sdxl_pipe(0)
    load_lcm_lora(pipe, SDXLConfig(lora_id=str(tmp_path), fuse_lora=True))
    lora = SDXLLCMGenerator(pipe, cfg)
    r = [GenRequest('a', PromptSpec('daisy', 'a daisy'), 1)]
    assert max_pixel_diff(base.generate(r)[0], lora.generate(r)[0]) > 0
    with pytest.raises(SidclipError, match='does not exist'): load_lcm_lora(_tiny_sdxl_pipe(0), SDXLConfig(lora_id='./no/lora'))
