"""`sidclip export` -> `sidclip predict` round trip on the tiny offline run, the torch-free predictor, and bad input."""
import csv, json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest

pytest.importorskip('onnxruntime'); pytest.importorskip('onnxscript')
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'SIDCLIP_OFFLINE': '1', 'MPLBACKEND': 'Agg'}

def sidclip(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'sidclip_guide', *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A finished tiny `sidclip distill` run, exported to ONNX with int8."
    out = tmp_path_factory.mktemp('deploy')/'run'
    r = sidclip('distill', '--tiny', '--out', out, '--epochs', '1', '--quiet')
    assert r.returncode == 0, r.stderr
    r = sidclip('export', out, '--int8')
    assert r.returncode == 0, r.stderr
    return out

def test_export_checks_parity_and_reports_int8(run):
    rep = json.loads((run/'export'/'export.json').read_text())
    assert rep['parity']['max_abs_diff'] <= 1e-4 and rep['parity']['top1_agreement'] == 1.0 and rep['parity']['images'] > 0
    q = rep['int8']
    assert Path(q['file']).is_file() and q['test_images'] > 0
    for key in ('top1_fp32', 'top1_int8', 'top1_change', 'top1_agreement'): assert 0 <= abs(q[key]) <= 1, key
    assert abs(q['top1_change'] - (q['top1_int8'] - q['top1_fp32'])) < 1e-9

def test_predict_round_trip_csv_and_unreadable_image(run, tmp_path):
    (tmp_path/'broken.jpg').write_bytes(b'not an image')
    out = tmp_path/'preds.csv'
    r = sidclip('predict', run/'export'/'student.onnx', run/'toy', tmp_path/'broken.jpg', '--format', 'csv', '--top', '2', '--out', out)
    assert r.returncode == 1, r.stderr                      # some image failed: exit 1, the rest classified
    assert 'broken.jpg: not a readable image' in r.stderr and 'Traceback' not in r.stderr
    rows = list(csv.DictReader(out.open()))
    n_toy = len([p for p in (run/'toy').rglob('*.png')])
    assert len([x for x in rows if x['rank'] == '1']) == n_toy and len([x for x in rows if x['rank'] == '2']) == n_toy
    assert [x for x in rows if x['error']][0]['path'].endswith('broken.jpg')
    names = json.loads((run/'student.json').read_text())['class_names']
    assert {x['class'] for x in rows if x['class']} <= set(names)

def test_predict_from_run_folder_agrees_with_onnx(run):
    a, b = (sidclip('predict', m, run/'toy', '--format', 'json') for m in (run/'export'/'student.onnx', run))
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert [x['top'][0]['class'] for x in ja] == [x['top'][0]['class'] for x in jb]
    assert max(abs(x['top'][0]['probability'] - y['top'][0]['probability']) for x, y in zip(ja, jb)) < 1e-4

def test_predict_needs_no_torch(run):
    "With every `torch` import refused, `sidclip predict model.onnx` still classifies."
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'torchvision', 'timm', 'open_clip'): raise ImportError('no ' + name)
        sys.meta_path.insert(0, NoTorch())
        from sidclip_guide.cli import main
        rc = main(['predict', {str(run/'export'/'student.int8.onnx')!r}, {str(run/'toy')!r}, '--top', '1'])
        assert 'torch' not in sys.modules
        sys.exit(rc)""")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(list((run/'toy').rglob('*.png')))

def test_export_torch_export_format(run, tmp_path):
    r = sidclip('export', run, '--format', 'pt2', '--out', tmp_path/'pt2')
    assert r.returncode == 0, r.stderr
    assert (tmp_path/'pt2'/'student.pt2').is_file()
    assert json.loads((tmp_path/'pt2'/'export.json').read_text())['parity']['top1_agreement'] == 1.0

@pytest.mark.parametrize('args, message', [
    (['export', '{tmp}'], 'student.safetensors'),                             # a folder without a student
    (['export', '{run}', '--format', 'tflite'], "choose from ['onnx', 'pt2']"),   # unknown format
    (['export', '{run}', '--format', 'pt2', '--int8'], "use format='onnx'"),
    (['predict', '{tmp}/model.onnx', '{run}/toy'], 'model.onnx does not exist'),
    (['predict', '{run}/student.json', '{run}/toy'], 'not a model ONNX Runtime can load'),
    (['predict', '{run}/export/student.onnx', '{tmp}'], 'No images in'),
    (['predict', '{run}/export', '{run}/toy'], 'holds 2 .onnx files'),
])
def test_bad_input_is_one_line(run, tmp_path, args, message):
    r = sidclip(*[a.format(run=run, tmp=tmp_path) for a in args])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

@pytest.mark.parametrize('cmd', ['export', 'predict'])
def test_help_explains_itself(cmd):
    r = sidclip(cmd, '--help')
    assert r.returncode == 0 and f'usage: sidclip {cmd}' in r.stdout and len(r.stdout.splitlines()) > 10
