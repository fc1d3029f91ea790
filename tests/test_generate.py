"""Crash/resume, multi-process sharding, bad manifests and the `synth` CLI of `sidclip_guide.generate`.

These need real processes (a SIGKILL, `torchrun` with 2 CPU ranks), which a notebook cell can't hold."""
import hashlib, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
from PIL import Image

from sidclip_guide.utils import SidclipError, slugify
from sidclip_guide.prompts import builtin_config
from sidclip_guide.generate import (MANIFEST, NoiseGenerator, item_file, merge_manifests, plan_items, read_manifest,
                                    run_generation, SyntheticDataset)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent/'shared'
CLASSES = ['daisy', 'red rose', 'sun flower']
ENV = {**os.environ, 'PYTHONPATH': str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''), 'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)   # tiny pipelines in-process on a shared CPU
    yield
    torch.set_num_threads(n)


def synth_cmd(out, n=6, gen='noise', mode='prompt', extra=()):
    return [sys.executable, '-m', 'sidclip_guide', 'synth', '--classes', ','.join(CLASSES), '--out', str(out),
            '--generator', gen, '--mode', mode, '--n-per-class', str(n), '--batch-size', '4', '--device', 'cpu',
            '--dataset-dims', 'flowers', '--no-progress', *extra]


def run(cmd, env=None, check=True, **kw):
    p = subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=120, **kw)
    if check: assert p.returncode == 0, p.stdout + p.stderr
    return p


def snapshot(out: Path) -> dict:
    "Relative path -> sha1 of every file but the manifest (asserts every image decodes and no temp file is left)."
    res = {}
    for p in sorted(out.rglob('*')):
        if not p.is_file() or p.parent == out: continue
        assert not p.name.endswith('.tmp'), f'temp file left: {p}'
        with Image.open(p) as im: im.load()
        res[p.relative_to(out).as_posix()] = hashlib.sha1(p.read_bytes()).hexdigest()
    return res


def check_complete(out: Path, n: int):
    "Exactly the planned images, each once in manifest.jsonl and on disk, and nothing else."
    plan = plan_items(CLASSES, 'prompt', n)
    lines = [json.loads(l) for l in (out/MANIFEST).read_text().splitlines() if l.strip()]
    ids = [r['item_id'] for r in lines]
    assert len(ids) == len(set(ids)), 'duplicated manifest lines'
    assert sorted(ids) == sorted(r.item_id for r in plan)
    assert set(snapshot(out)) == {item_file(r) for r in plan}
    assert not list(out.glob('manifest.rank*.jsonl'))
    return read_manifest(out)


@pytest.mark.parametrize('crash_at', ['save:5', 'append:8'])
def test_crash_then_resume(tmp_path, crash_at):
    "Hard exit right after an image is saved (before its manifest line) or right after an append; resume once."
    out = tmp_path/'o'
    p = run(synth_cmd(out), env={**ENV, 'SIDCLIP_CRASH_AT': crash_at}, check=False)
    assert p.returncode == 137, p.stderr
    before = len(read_manifest(out, check_files=False)) if (out/MANIFEST).exists() else 0
    assert before < 18
    run(synth_cmd(out))
    rows = check_complete(out, 6)
    # identical to an uninterrupted run
    ref = tmp_path/'ref'
    run_generation(NoiseGenerator(32), plan_items(CLASSES, 'prompt', 6, prompt_cfg=builtin_config('flowers')),
                   ref, batch_size=4, class_names=CLASSES, progress=False)
    assert snapshot(out) == snapshot(ref)
    assert [r['seed'] for r in rows] == [r['seed'] for r in read_manifest(ref)]


KILLER = """
import sys
from sidclip_guide.generate import NoiseGenerator, plan_items, run_generation
run_generation(NoiseGenerator(32, delay=0.05), plan_items({classes!r}, 'prompt', 6), sys.argv[1], batch_size=1, progress=False)
"""

def test_sigkill_mid_run(tmp_path):
    "A real `kill -9` at an arbitrary moment, twice, then a resume: exactly the requested images."
    out = tmp_path/'k'
    for stop_after in (3, 9):
        proc = subprocess.Popen([sys.executable, '-c', KILLER.format(classes=CLASSES), str(out)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 60:
            m = out/MANIFEST
            if m.exists() and m.read_text().count('\n') >= stop_after: break
            if proc.poll() is not None: break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL); proc.wait()
    assert len(read_manifest(out, check_files=False)) < 18
    st = run_generation(NoiseGenerator(32, delay=0.05), plan_items(CLASSES, 'prompt', 6), out, batch_size=1, progress=False)
    assert st['existing'] + st['generated'] == 18
    check_complete(out, 6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    "torchrun with 2 CPU ranks (gloo, via accelerate's PartialState) writes exactly what one process writes."
    one, two = tmp_path/'one', tmp_path/'two'
    run(synth_cmd(one, n=5))
    env = {**ENV, 'MASTER_ADDR': '127.0.0.1', 'GLOO_SOCKET_IFNAME': 'lo'}
    cmd = synth_cmd(two, n=5)
    p = run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
             '--master_port', str(free_port()), *cmd[1:]], env=env)
    assert 'manifest.jsonl' in p.stdout
    assert snapshot(one) == snapshot(two)
    assert (one/MANIFEST).read_text() == (two/MANIFEST).read_text()     # merged, sorted by item_id: byte-identical
    assert not list(two.glob('manifest.rank*.jsonl'))


def test_rank_manifests_merge_and_resume(tmp_path):
    "Rank 1 finished but rank 0 crashed before merging: a 1-process resume completes and merges."
    plan = plan_items(CLASSES, 'text', 4)
    run_generation(NoiseGenerator(16), plan, tmp_path, rank=1, world_size=2, progress=False)
    run_generation(NoiseGenerator(16), plan[:2], tmp_path, rank=0, world_size=2, progress=False)
    assert {p.name for p in tmp_path.glob('manifest*.jsonl')} == {'manifest.rank0.jsonl', 'manifest.rank1.jsonl'}
    assert len(read_manifest(tmp_path)) == 7                      # reading a folder sees unmerged rank files
    st = run_generation(NoiseGenerator(16), plan, tmp_path, progress=False)
    assert (st['existing'], st['generated']) == (7, 5)
    assert [p.name for p in tmp_path.glob('manifest*.jsonl')] == [MANIFEST]
    assert [r['item_id'] for r in read_manifest(tmp_path/MANIFEST)] == sorted(r.item_id for r in plan)
    merge_manifests(tmp_path)                                      # idempotent
    assert len(read_manifest(tmp_path)) == 12


def test_bad_manifests(tmp_path):
    plan = plan_items(CLASSES, 'text', 2)
    run_generation(NoiseGenerator(16), plan, tmp_path, progress=False)
    with pytest.raises(SidclipError, match='planned differently'):           # same ids, other seeds: refuse to mix two plans
        run_generation(NoiseGenerator(16), plan_items(CLASSES, 'text', 2, seed=9), tmp_path, progress=False)
    rows = read_manifest(tmp_path)
    (tmp_path/rows[2]['file']).unlink()
    with pytest.raises(SidclipError, match='missing'): read_manifest(tmp_path)
    assert len(read_manifest(tmp_path, check_files=False)) == 6
    lines = (tmp_path/MANIFEST).read_text().splitlines()
    (tmp_path/MANIFEST).write_text('\n'.join(lines[:2] + ['{oops'] + lines[2:]) + '\n')
    with pytest.raises(SidclipError, match='line 3 is not valid JSON'): read_manifest(tmp_path, check_files=False)
    (tmp_path/MANIFEST).write_text(json.dumps({'item_id': 'x', 'file': 'x.png'}) + '\n')
    with pytest.raises(SidclipError, match='not a sidclip manifest row'): read_manifest(tmp_path)
    with pytest.raises(SidclipError, match='does not exist'): read_manifest(tmp_path/'nothing')
    with pytest.raises(SidclipError, match='Duplicate item_id'): run_generation(NoiseGenerator(16), plan + plan[:1], tmp_path/'d', progress=False)


def test_cli_synth_tiny_sdxl(tmp_path, capsys):
    "`synth` with the tiny random-weight SDXL-LCM pipeline (prompt mode), in-process (the subprocess CLI path is covered above)."
    from sidclip_guide.cli import main
    out = tmp_path/'tiny-sdxl'
    assert main(synth_cmd(out, n=2, gen='tiny-sdxl', mode='prompt')[3:]) == 0
    assert str(out/MANIFEST) in capsys.readouterr().out
    rows = read_manifest(out)
    assert len(rows) == 6 and {r['class_name'] for r in rows} == set(CLASSES)
    assert rows[0]['generator'] == 'sdxl-lcm' and rows[0]['settings']['steps'] == 6 and rows[0]['settings']['guidance_scale'] == 0.5
    assert all('a type of flower' in r['prompt'] for r in rows)
    with Image.open(out/rows[0]['file']) as im: assert im.size == (32, 32)


def test_cli_synth_per_class_options(tmp_path, capsys):
    """`sidclip synth --options llm --llm MODEL`: offline without the model, one clear line; with the cache (options.json, the
    file the LLM run writes) already in --out, or passed back edited with --options FILE, the prompts use each class's own
    options and superclass and no model is loaded. `--template` gives Popp's sketch test set, `--clip-templates` A.6's openings."""
    from sidclip_guide.cli import main
    out = tmp_path/'llm'
    assert main(synth_cmd(out, n=2, mode='prompt', extra=['--options', 'llm', '--llm', 'sidclip-test/no-such-llm'])[3:]) == 2
    assert "Could not load the LLM 'sidclip-test/no-such-llm'" in capsys.readouterr().err
    dims = ['color', 'locations', 'daytime', 'camera angle']
    opts = {c: {**{d: [f'{d} for {c} {i}' for i in range(3)] for d in dims}, 'superclass': [f'super-{c.split()[0]}']} for c in CLASSES}
    out.mkdir(exist_ok=True); (out/'options.json').write_text(json.dumps(opts))
    assert main(synth_cmd(out, n=2, mode='prompt', extra=['--options', 'llm', '--llm', 'sidclip-test/no-such-llm'])[3:]) == 0
    rows = read_manifest(out)
    assert all(f"which is a type of super-{r['class_name'].split()[0]}" in r['prompt'] and f"for {r['class_name']} " in r['prompt'] for r in rows)
    edited = tmp_path/'mine.json'; edited.write_text(json.dumps({**opts, 'daisy': {**opts['daisy'], 'superclass': ['wildflower']}}))
    out2 = tmp_path/'edited'
    assert main(synth_cmd(out2, n=2, mode='prompt', extra=['--options', str(edited), '--template', 'a sketch of a {classname}'])[3:]) == 0
    rows = [r for r in read_manifest(out2) if r['class_name'] == 'daisy']
    assert rows and all(r['prompt'].startswith('a sketch of a (daisy)1.2, which is a type of wildflower') for r in rows)
    del opts['sun flower']; edited.write_text(json.dumps(opts))
    assert main(synth_cmd(tmp_path/'x', n=2, mode='prompt', extra=['--options', str(edited)])[3:]) == 2
    assert "no options for class 'sun flower'" in capsys.readouterr().err


def test_real_shots_mix(tmp_path):
    "Mix mode from real CIFAR-10 shots with the tiny Kandinsky generator, read back as a dataset."
    data = SHARED/'data'/'cifar10-photos'
    if not data.exists(): pytest.skip(f'{data} not present')
    from sidclip_guide.generate import make_generator
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())[:2]
    shots = {c: sorted((data/c).glob('*.jpg'))[:2] for c in classes}
    plan = plan_items(shots, 'mix', 3, seed=1)
    assert all(len(r.cond.image_paths) == 2 and abs(sum(r.cond.weights) - 1) < 1e-6 for r in plan)
    run_generation(make_generator('tiny-kandinsky'), plan, tmp_path, batch_size=3, class_names=classes, progress=False)
    rows = read_manifest(tmp_path)
    assert len(rows) == 6 and set(rows[0]['source_images']) <= {str(p) for p in shots[classes[0]]}
    ds = SyntheticDataset(rows, tmp_path, classes)
    x, y = ds[5]
    assert x.shape[0] == 3 and 0 <= float(x.min()) and float(x.max()) <= 1 and y == 1


def test_cli_from_saved_split(tmp_path):
    "`synth --split` reads a saved FewShotSplit: labels follow its class order, mixes use its k shots (in-process)."
    from sidclip_guide.data import make_toy_dataset, make_fewshot_split, save_split
    from sidclip_guide.cli import main
    split = make_fewshot_split(make_toy_dataset(tmp_path/'toy', n_classes=2, n_per_class=6), k=2, seed=0)
    save_split(split, tmp_path/'split.json')
    out = tmp_path/'o'
    assert main(['synth', '--split', str(tmp_path/'split.json'), '--out', str(out), '--generator', 'tiny-kandinsky', '--mode', 'mix',
                 '--n-per-class', '2', '--k', '1', '--device', 'cpu', '--no-progress']) == 0
    rows = read_manifest(out)
    assert [r['label'] for r in rows] == [0, 0, 1, 1]
    shots = split.shots_by_class(1)
    assert all(r['source_images'] == [str(shots[r['label']][0])] and r['weights'] == [0.4, 0.6] for r in rows)


def test_bad_values_are_errors_not_defaults(tmp_path):
    "A changed --ext on resume, batch size 0 and image size 0 are one-line errors (they used to be silently ignored or replaced)."
    from sidclip_guide.generate import make_generator
    reqs = plan_items(CLASSES[:1], 'text', 2)
    run_generation(NoiseGenerator(32), reqs, tmp_path/'a', progress=False)
    with pytest.raises(SidclipError, match=r"holds \.png images but ext='jpg'"):
        run_generation(NoiseGenerator(32), plan_items(CLASSES[:1], 'text', 3), tmp_path/'a', ext='jpg', progress=False)
    with pytest.raises(SidclipError, match='batch_size=0'): run_generation(NoiseGenerator(32), reqs, tmp_path/'b', batch_size=0, progress=False)
    with pytest.raises(SidclipError, match='image_size=0 is too small'): make_generator('noise', 'cpu', image_size=0)
    r = run(synth_cmd(tmp_path/'c', extra=('--image-size', '0')), check=False)
    assert r.returncode == 2 and 'image_size=0' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_every_image_stays_inside_out():
    "An empty class name gets a real folder (it once wrote to /-00000.png); an item id with a path in it is refused."
    import dataclasses
    r = plan_items([''], 'text', 1)[0]
    assert item_file(r).startswith('class-') and not item_file(r).startswith('/')
    for bad in ('../escape', '/etc/x', '..', ''):
        with pytest.raises(SidclipError, match='stay inside --out'): item_file(dataclasses.replace(r, item_id=bad))
