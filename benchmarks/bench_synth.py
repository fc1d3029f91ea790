"""Images/s of the SIDCLIP generation runner vs a naive per-image loop over the same Kandinsky 2.2 pipelines.

Ours: `sidclip_guide.generate.run_generation` with `KandinskyGenerator` (batched prior for the text part, shot image
embeddings computed once and cached, batched decoder, atomic saves + manifest).
Naive: for every image, `prior.interpolate([class name, shot a, shot b], [0.2, 0.4, 0.4])` (re-encodes the shots, prior
at batch 1) then the decoder at batch 1, then `img.save` -- the diffusers tutorial recipe. Same pipeline objects, same
steps, guidance, size and dtype.

    python benchmarks/bench_synth.py                    # tiny random-weight pipelines on CPU (< 2 min)
    python benchmarks/bench_synth.py --full-size        # real-size Kandinsky 2.2 architectures, random weights, fp16 on CUDA

Prints a table and the ratio (target >= 3x). Measured 2026-11-25: real-size fp16 on one H100, 512 px, 25 prior + 50 decoder
steps, 16 images: 0.46 -> 1.78 images/s (3.9x, batch 16); 8 images at batch 8: 3.6x. Tiny on a shared 2-core CPU: 4-19x
(load-dependent)."""
import argparse, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidclip_guide import synthesize as S
from sidclip_guide.generate import plan_items, run_generation, read_manifest


def full_size_kandinsky(device: str, dtype: torch.dtype, seed: int = 0):
    "Kandinsky 2.2 prior + decoder pipelines with the real architectures (ViT-bigG CLIP, 20-layer prior, 1.2B UNet, MoVQ), random weights."
    from diffusers import (KandinskyV22PriorPipeline, KandinskyV22Pipeline, PriorTransformer, UnCLIPScheduler,
                           UNet2DConditionModel, VQModel, DDPMScheduler)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              CLIPImageProcessor)
    old = torch.get_default_dtype()
    torch.manual_seed(seed); torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, projection_dim=1280, max_position_embeddings=77, hidden_act='gelu', bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
            vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                num_attention_heads=16, projection_dim=1280, image_size=224, patch_size=14, hidden_act='gelu'))
            prior = PriorTransformer(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=1280,
                                     num_embeddings=77, additional_embeddings=4, dropout=0.0)
            unet = UNet2DConditionModel(in_channels=4, out_channels=8, sample_size=64, addition_embed_type='image',
                down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D'),
                up_block_types=('SimpleCrossAttnUpBlock2D', 'SimpleCrossAttnUpBlock2D', 'SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'),
                mid_block_type='UNetMidBlock2DSimpleCrossAttn', block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
                encoder_hid_dim=1280, encoder_hid_dim_type='image_proj', cross_attention_dim=768, attention_head_dim=64,
                resnet_time_scale_shift='scale_shift', addition_embed_type_num_heads=64)
            movq = VQModel(block_out_channels=[128, 256, 256, 512], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                down_block_types=['DownEncoderBlock2D'] * 3 + ['AttnDownEncoderBlock2D'], up_block_types=['AttnUpDecoderBlock2D'] + ['UpDecoderBlock2D'] * 3,
                norm_num_groups=32, norm_type='spatial', num_vq_embeddings=16384, vq_embed_dim=4)
    finally:
        torch.set_default_dtype(old)
    proc = CLIPImageProcessor(size={'shortest_edge': 224}, crop_size={'height': 224, 'width': 224}, do_resize=True, do_center_crop=True,
                              do_normalize=True, resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    pp = KandinskyV22PriorPipeline(prior=prior.eval(), image_encoder=vision.eval(), text_encoder=text.eval(), tokenizer=S.offline_clip_tokenizer(),
        image_processor=proc, scheduler=UnCLIPScheduler(variance_type='fixed_small_log', prediction_type='sample', num_train_timesteps=1000,
                                                        clip_sample=True, clip_sample_range=10.0))
    dp = KandinskyV22Pipeline(unet=unet.eval(), movq=movq.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear',
                              beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type='epsilon'))
    return pp, dp


def naive_loop(gen, reqs, out: Path) -> int:
    "The per-image recipe: interpolate (re-encodes shots, batch 1) + decoder (batch 1) + save."
    c, prior, decoder = gen.config, gen.prior, gen.decoder
    out.mkdir(parents=True, exist_ok=True)
    for r in reqs:
        m = r.cond
        items = [m.prompt] + [Image.open(p).convert('RGB') for p in m.image_paths]
        emb = prior.interpolate(items, m.weights, num_inference_steps=c.prior_steps, guidance_scale=c.prior_guidance_scale,
                                generator=torch.Generator('cpu').manual_seed(r.seed))
        dt = decoder.unet.dtype
        img = decoder(image_embeds=emb.image_embeds.to(dt), negative_image_embeds=emb.negative_image_embeds.to(dt), height=c.height,
                      width=c.width, num_inference_steps=c.decoder_steps, guidance_scale=c.guidance_scale,
                      generator=torch.Generator('cpu').manual_seed(r.seed)).images[0]
        img.save(out/f'{r.item_id}.png')
    return len(reqs)


def sync(device):
    if str(device).startswith('cuda'): torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--full-size', action='store_true', help='real-size architectures (random weights), for a GPU')
    ap.add_argument('--device', default=None, help='default: cuda if available else cpu')
    ap.add_argument('--classes', type=int, default=2)
    ap.add_argument('--n-per-class', type=int, default=None, help='default: 12 tiny, 8 full-size')
    ap.add_argument('--batch-size', type=int, default=None, help='default: 24 tiny, 8 full-size')
    ap.add_argument('--size', type=int, default=None, help='output side (default: 32 tiny, 512 full-size)')
    ap.add_argument('--prior-steps', type=int, default=None, help='default: 2 tiny, 25 full-size (diffusers default)')
    ap.add_argument('--decoder-steps', type=int, default=None, help='default: 2 tiny, 50 full-size (diffusers default)')
    a = ap.parse_args(argv)
    dev = a.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    full = a.full_size
    n = a.n_per_class or (8 if full else 12); bs = a.batch_size or (8 if full else 24); size = a.size or (512 if full else 32)
    ps, ds = a.prior_steps or (25 if full else 2), a.decoder_steps or (50 if full else 2)
    if full:
        dtype = torch.float16 if dev.startswith('cuda') else torch.float32
        t0 = time.time(); pp, dp = full_size_kandinsky(dev, dtype)
        print(f'built real-size random-weight pipelines in {time.time()-t0:.0f}s '
              f'({sum(p.numel() for m in (pp.prior, pp.text_encoder, pp.image_encoder, dp.unet, dp.movq) for p in m.parameters())/1e9:.2f}B params, {dtype})')
        cfg = S.KandinskyConfig(prior_id='random-full-size', decoder_id='random-full-size', prior_steps=ps, decoder_steps=ds,
                                height=size, width=size, dtype='fp16' if dtype == torch.float16 else 'fp32', device=dev)
        gen = S.KandinskyGenerator(pp, dp, cfg)
    else:
        gen = S.tiny_kandinsky_generator(device=dev, image_size=size, steps=ps)
        gen.config.decoder_steps = ds
    tmp = Path(tempfile.mkdtemp(prefix='bench_synth_'))
    rng = np.random.default_rng(0)
    shots = {}
    for c in range(a.classes):
        shots[f'class {c}'] = []
        for k in range(2):
            p = tmp/'shots'/f'{c}_{k}.png'; p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p); shots[f'class {c}'].append(str(p))
    reqs = plan_items(shots, 'mix', n, seed=0)                 # 2 shots -> weights 0.2 / 0.4 / 0.4
    # warm-up both paths (CUDA kernels, lazy inits), not timed
    gen.generate(reqs[:2]); naive_loop(gen, reqs[:1], tmp/'warm'); gen._img_cache.clear()
    sync(dev); t0 = time.time()
    naive_n = naive_loop(gen, reqs, tmp/'naive'); sync(dev); t_naive = time.time() - t0
    t0 = time.time()
    st = run_generation(gen, reqs, tmp/'ours', batch_size=bs, progress=False); sync(dev); t_ours = time.time() - t0
    assert len(read_manifest(tmp/'ours')) == len(reqs)
    ips_n, ips_o = naive_n / t_naive, st['generated'] / t_ours
    dname = torch.cuda.get_device_name(0) if dev.startswith('cuda') else 'CPU'
    print(f"\nKandinsky 2.2 {'real-size (random weights)' if full else 'tiny (random weights)'} on {dname}: "
          f"{len(reqs)} images of {size}px, prior {ps} steps, decoder {ds} steps, 2 shots mixed 0.2/0.4/0.4\n")
    print(f"| {'method':<46} | {'images':>6} | {'seconds':>8} | {'images/s':>8} |")
    print(f"|{'-'*48}|{'-'*8}|{'-'*10}|{'-'*10}|")
    print(f"| {'naive: interpolate + decoder per image':<46} | {naive_n:>6} | {t_naive:>8.2f} | {ips_n:>8.3f} |")
    print(f"| {f'ours: run_generation (batch {bs}, cached shots)':<46} | {st['generated']:>6} | {t_ours:>8.2f} | {ips_o:>8.3f} |")
    print(f"\nspeed-up: {ips_o / ips_n:.2f}x (target >= 3x)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
