"""The `sidclip` console script: help texts, exit codes, and the offline demo end to end."""
import os, subprocess, sys, time
from pathlib import Path
import pytest

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'SIDCLIP_OFFLINE': '1', 'MPLBACKEND': 'Agg'}

def sidclip(*args, cwd=None, timeout=600):
    "Run `python -m sidclip_guide ARGS` (the same entry point as the `sidclip` script)."
    return subprocess.run([sys.executable, '-m', 'sidclip_guide', *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)

def test_help_lists_every_subcommand():
    r = sidclip('--help')
    assert r.returncode == 0
    for cmd in ('demo', 'eval', 'synth', 'distill', 'pretrain', 'probe', 'run', 'export', 'predict'): assert cmd in r.stdout

@pytest.mark.parametrize('cmd', ['demo', 'eval', 'synth', 'distill', 'pretrain', 'probe', 'run', 'export', 'predict'])
def test_each_subcommand_explains_itself(cmd):
    r = sidclip(cmd, '--help')
    assert r.returncode == 0 and 'usage: sidclip ' + cmd in r.stdout
    assert len(r.stdout.splitlines()) > 5   # a description and documented options, not a bare usage line

def test_console_script_is_installed():
    import shutil
    exe = shutil.which('sidclip')
    if exe is None: pytest.skip('package not pip-installed (no console script on PATH)')
    r = subprocess.run([exe, '--version'], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and 'sidclip-guide' in r.stdout

def test_bad_input_gives_a_clear_error_and_exit_2(tmp_path):
    r = sidclip('eval', '--split', str(tmp_path/'missing.json'), '--model', 'sidclip-tiny-vit')
    assert r.returncode == 2, r.stderr
    assert 'missing.json' in r.stderr and 'Traceback' not in r.stderr
    r = sidclip('run', 'tiny', '--stages', 'split,nope', '--out', str(tmp_path/'d'))
    assert r.returncode == 2 and "unknown stage(s) ['nope']" in r.stderr

def test_demo_runs_offline_end_to_end(tmp_path):
    "`sidclip demo` (`sidclip run tiny` and the Table 1 rows) writes report.md, the results and plots under the current directory by default."
    t0 = time.time()
    r = sidclip('demo', cwd=tmp_path)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path/'sidclip-demo'
    report = (out/'report.md').read_text()
    assert str(out) in r.stdout and 'wiring, not accuracy' in r.stdout
    for stage in ('split', 'synth', 'teacher', 'distill', 'evaluate', 'probe'): assert f'| {stage} |' in report, stage
    assert 'SIDCLIP Table 1' in report and 'ENB0 + I + D + S (SIDCLIP)' in report
    import pandas as pd
    assert set(pd.read_csv(out/'grid'/'results.csv')['method']) == {'teacher', 'ENB0', 'ENB0 + D', 'ENB0 + I + D', 'SIDCLIP'}
    assert 'linear probe on the untrained student' in set(pd.read_csv(out/'eval'/'results.csv')['model'])
    r2 = sidclip('demo', cwd=tmp_path)                 # a rerun continues: everything is done already
    assert r2.returncode == 0 and r2.stdout.count('done already') == 6, r2.stdout
    pngs = list(out.rglob('*.png'))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    for line in report.splitlines():          # every plot the report shows exists
        if line.startswith('!['): assert (out/line.split('](')[1].rstrip(')')).exists(), line
    used = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
    assert used < 120e6, f'the demo wrote {used / 1e6:.0f} MB; the README promises about 80 MB'   # one checkpoint per run is kept
    print(f'demo took {elapsed:.0f}s and wrote {used / 1e6:.0f} MB')

def test_out_that_is_a_file_is_one_line(tmp_path):
    "A file where --out's folder should be: the path and the fix on one line, exit 2, no traceback."
    f = tmp_path/'taken'; f.write_text('x')
    r = sidclip('distill', '--tiny', '--out', str(f/'run'), '--epochs', '1', '--quiet')
    assert r.returncode == 2, r.stderr
    assert 'a file stands where a folder should be' in r.stderr and str(f) in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

def test_second_writer_is_refused_and_a_killed_one_frees_the_folder(tmp_path):
    """Two real processes on one --out: while a `sidclip distill` runs, a second one (and `synth`, `run`) is refused with a
    line naming the first (pid, host, command, since); `run --dry-run` only reads and goes ahead. After `kill -9` of the
    first, the kernel has released its lock: the same command again proceeds (and continues its run)."""
    import json, signal
    out = tmp_path/'run'
    first = subprocess.Popen([sys.executable, '-m', 'sidclip_guide', 'distill', '--tiny', '--out', str(out), '--epochs', '2000', '--quiet'],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not (out/'.sidclip.lock.json').exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() - t0 < 300, 'the first process never took the lock'
            time.sleep(0.1)
        held = json.loads((out/'.sidclip.lock.json').read_text())
        assert held['pid'] == first.pid and 'sidclip distill --tiny --out' in held['command'] and held['since'], held
        r = sidclip('distill', '--tiny', '--out', str(out), '--epochs', '1', '--quiet')
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and 'Traceback' not in line, r.stderr
        assert f'{out} is in use by pid {first.pid} on {held["host"]} since {held["since"]}' in line and '--epochs 2000' in line, line
        assert sidclip('synth', '--classes', 'a,b', '--out', str(out), '--generator', 'noise', '--mode', 'text', '--quiet').returncode == 2
        assert sidclip('run', 'tiny', '--out', str(out), '--quiet').returncode == 2
        assert sidclip('run', 'tiny', '--out', str(out), '--dry-run').returncode == 0          # reads only
        assert first.poll() is None, 'the first process ended before the checks were done: make it longer'
    finally:
        os.killpg(first.pid, signal.SIGKILL); first.wait()
    assert (out/'.sidclip.lock.json').exists()                                                  # the killed holder's label stays...
    r = sidclip('distill', '--tiny', '--out', str(out), '--epochs', '2000', '--stop-after', '1', '--quiet')   # ...but does not block
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out/'.sidclip.lock.json').exists()                                              # released at the end


def test_torchrun_shards_share_the_lock(tmp_path):
    "Only rank 0 of a launch takes the lock (RANK=1 skips it), so the shards of one torchrun synthesis are not refused by each other."
    code = ("import os, sys\nfrom sidclip_guide.utils import run_folder_lock\n"
            f"with run_folder_lock({str(tmp_path)!r}, 'rank 0'):\n"
            "    os.environ['RANK'] = '1'\n"
            f"    with run_folder_lock({str(tmp_path)!r}) as info: assert info is None\n"
            "    os.environ['RANK'] = '0'\n"
            "    try:\n"
            f"        with run_folder_lock({str(tmp_path)!r}): sys.exit('a second rank 0 got the lock')\n"
            "    except Exception as e: assert 'in use by pid' in str(e), e\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
