"""The weight-mixer widget in a real JupyterLab, driven by a real browser: JupyterLab on localhost, the widget cell of the
synthesis notebook run in Debian's headless `chromium` through `chromium-driver` (selenium; no browser download).
Typing a weight into the first slider must renormalise the others (Σ = 1) and update the similarity readout.

Needs `chromium`, `chromium-driver` (apt) and `selenium` (the `dev` extra); skipped, with the reason, where they are absent
(`.ci/run` installs them)."""
import json, os, socket, subprocess, sys, time, uuid
from pathlib import Path

import pytest
from _chrome import chrome, needs_chrome

REPO = Path(__file__).resolve().parents[1]
selenium = pytest.importorskip('selenium', reason='needs selenium (pip install -e ".[dev]")')
pytestmark = [needs_chrome]


def _widget_notebook(path: Path, shots: list[Path]) -> None:
    "A notebook holding the synthesis notebook's widget cell: the tiny random Kandinsky and two shots of a class."
    src = ("from sidclip_guide.generate import make_generator\n"
           "from sidclip_guide.synthesize import weight_mixer_widget\n"
           "kg = make_generator('tiny-kandinsky')\n"
           f"ui = weight_mixer_widget(kg, 'daisy', {[str(p) for p in shots]!r})\n"
           "ui")
    nb = {'cells': [{'cell_type': 'code', 'id': 'mixer', 'metadata': {}, 'execution_count': None, 'outputs': [], 'source': src}],
          'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}},
          'nbformat': 4, 'nbformat_minor': 5}
    path.write_text(json.dumps(nb))


def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving tmp_path on a free localhost port; yields the notebook's URL."
    from PIL import Image
    shots = []
    for i, c in enumerate(['yellow', 'white']):
        shots.append(tmp_path / f'daisy{i}.png'); Image.new('RGB', (32, 32), c).save(shots[-1])
    _widget_notebook(tmp_path / 'mixer.ipynb', shots)
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path / 'cfg'), 'JUPYTER_RUNTIME_DIR': str(tmp_path / 'rt')}
    log = open(tmp_path / 'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                             f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path}',
                             '--LabApp.expose_app_in_browser=True', *(['--allow-root'] if os.geteuid() == 0 else [])],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        import urllib.request
        for _ in range(120):
            try: urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={token}', timeout=2); break
            except OSError: time.sleep(0.5)
        else: pytest.fail(f'JupyterLab did not start: {(tmp_path / "lab.log").read_text()[-2000:]}')
        yield f'http://127.0.0.1:{port}/lab/tree/mixer.ipynb?token={token}'
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    with chrome(tmp_path / 'chrome') as d: yield d


def _texts(d, css: str) -> list[str]:
    return [e.text.strip() for e in d.find_elements('css selector', css)]


def test_mixer_sliders_renormalise_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait
    d, wait = browser, WebDriverWait(browser, 120, poll_frequency=0.5)
    d.get(lab)
    wait.until(lambda d: d.execute_script(                                   # the notebook is open and its kernel idle
        "const a = window.jupyterapp; const w = a && Array.from(a.shell.widgets('main')).find(x => x.sessionContext);"
        "if (w) a.shell.activateById(w.id);"
        "const k = w && w.sessionContext.session && w.sessionContext.session.kernel; return !!(k && k.status === 'idle');"))
    d.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")   # what Run > Run All Cells does
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.widget-slider .widget-readout')) == 3)
    wait.until(lambda d: 'cos(mix, text)' in ' '.join(_texts(d, '.widget-html-content')))
    assert _texts(d, '.widget-slider .widget-readout') == ['0.20', '0.40', '0.40']   # SIDCLIP's 2-shot weights
    before = ' '.join(_texts(d, '.widget-html-content'))
    first = d.find_elements(By.CSS_SELECTOR, '.widget-slider .widget-readout')[0]   # the readout is editable: type a weight
    first.click()
    ActionChains(d).key_down(Keys.CONTROL).send_keys('a').key_up(Keys.CONTROL).send_keys('0.6', Keys.ENTER).perform()
    wait.until(lambda d: _texts(d, '.widget-slider .widget-readout') == ['0.60', '0.20', '0.20'])   # the others renormalised, Σ = 1
    wait.until(lambda d: ' '.join(_texts(d, '.widget-html-content')) != before)                      # the similarity readout followed
    after = ' '.join(_texts(d, '.widget-html-content'))
    assert 'Σw = 1.000' in after and 'cos(mix, text)' in after
