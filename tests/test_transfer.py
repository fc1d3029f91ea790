"""Transfer photos through the CLI as real processes: a run with `--images` killed with SIGKILL resumes to the same
student as an uninterrupted one (the teacher's head refit on the photos included); a folder holding a test photo is refused in one line; the run reports teacher and
student top-1 side by side and writes valid JSON."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

from safetensors.torch import load_file

from sidclip_guide.data import make_toy_dataset
from sidclip_guide.distill import read_checkpoint_manifest   # imported before the race: the poll below must be quick

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'SIDCLIP_OFFLINE': '1', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}


def _cmd(out, extra, epochs=60):
    return [sys.executable, '-m', 'sidclip_guide', 'distill', '--tiny', '--seed', '1', '--epochs', str(epochs), '--images', str(extra),
            '--out', str(out), '--quiet']


def _strict_json(path: Path):
    "Parse JSON refusing NaN/Infinity, which `json.loads` would accept."
    def no(c): raise ValueError(f'{path} holds {c}: not valid JSON')
    return json.loads(path.read_text(), parse_constant=no)


def _epoch(out: Path) -> int:
    try: return (read_checkpoint_manifest(out / 'checkpoints').get('latest') or {}).get('epoch', 0)
    except Exception: return 0      # no manifest yet, or caught mid-write


def test_transfer_run_resumes_after_kill9_and_reports_both_top1(tmp_path):
    make_toy_dataset(tmp_path / 'extra', n_classes=3, n_per_class=4, size=40, seed=7)   # other photos of the toy classes
    ref = subprocess.run(_cmd(tmp_path / 'ref', tmp_path / 'extra'), env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert '12 transfer' in ref.stdout and '% teacher' in ref.stdout, ref.stdout         # teacher and student side by side
    rec = _strict_json(tmp_path / 'ref' / 'distill_set.json'); assert rec['transfer'] == 12 and rec['shots'] == 12, rec
    assert rec['teacher_refit']['photos'] == 12 and 'teacher head' in ref.stdout, (rec, ref.stdout)   # the refit (or why not) is told and kept
    _strict_json(tmp_path / 'ref' / 'config.json')                                          # no NaN (cv_score at small k)
    last = [json.loads(l) for l in (tmp_path / 'ref' / 'metrics.jsonl').read_text().splitlines()][-1]
    assert last['test_top1'] is not None and last['teacher_top1'] is not None, last
    killed = tmp_path / 'killed'
    p = subprocess.Popen(_cmd(killed, tmp_path / 'extra'), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while _epoch(killed) < 1:
        assert p.poll() is None, 'the run ended before it could be killed'
        assert time.time() - t0 < 600; time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert _epoch(killed) < 60, 'killed too late: nothing was left to resume'
    r = subprocess.run(_cmd(killed, tmp_path / 'extra'), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'continuing' in r.stdout, r.stdout + r.stderr[-2000:]
    a, b = load_file(str(tmp_path / 'ref' / 'student.safetensors')), load_file(str(killed / 'student.safetensors'))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), 'the resumed transfer run differs from the uninterrupted one'


def test_transfer_folder_with_a_test_photo_is_refused(tmp_path):
    out = tmp_path / 'run'
    toy = make_toy_dataset(out / 'toy', n_classes=3, n_per_class=10)   # the very folder `--tiny` writes: same bytes
    leak = tmp_path / 'leak'; leak.mkdir()
    for i, (p, _) in enumerate(toy.items): shutil.copy(p, leak / f'photo{i}.png')   # renamed copies of every toy photo
    r = subprocess.run(_cmd(out, leak, epochs=1), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert 'hold 18 test image(s)' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr   # 30 photos - 12 shots
