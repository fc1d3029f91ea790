"`sidclip run`: kill -9 and rerun ends equal to an uninterrupted run; every settings dataclass round-trips through YAML and the CLI; each setting is declared once."
import argparse, dataclasses, os, re, signal, subprocess, sys, time, typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sidclip_guide.cli import config_arguments, config_from_args, build_parser
from sidclip_guide.utils import config_to_dict, config_from_dict, config_yaml, read_config_file
from sidclip_guide.recipe import RunConfig, DataConfig, STAGE_NAMES, preset_config
from sidclip_guide.generate import SynthConfig
from sidclip_guide.distill import DistillConfig, TeacherConfig
from sidclip_guide.student import StudentConfig
from sidclip_guide.probes import ProbeConfig
from sidclip_guide.deploy import ExportConfig

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'SIDCLIP_OFFLINE': '1', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}
STAGES = 'split,synth,teacher,distill,evaluate'     # the probe stage is covered in the recipe notebook
RUN = [sys.executable, '-m', 'sidclip_guide', 'run', 'tiny', '--stages', STAGES, '--distill.epochs', '6', '--quiet']


def _run(out, *extra, check=True):
    r = subprocess.run(RUN + ['--out', str(out), *extra], env=ENV, capture_output=True, text=True, timeout=900)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r


def _kill_when(out: Path, ready, timeout=600):
    "Start the run and SIGKILL it as soon as `ready(out)` is true; returns how far it had got."
    p = subprocess.Popen(RUN + ['--out', str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not ready(out):
        assert p.poll() is None, 'the run finished before it could be killed'
        assert time.time() - t0 < timeout, 'the run never reached the kill point'
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()


def _epoch(out) -> int:
    "The epoch of the newest checkpoint (0 before the first)."
    from sidclip_guide.distill import read_checkpoint_manifest
    ck = out / 'distill' / 'checkpoints'
    try: return (read_checkpoint_manifest(ck).get('latest') or {}).get('epoch', 0) if ck.is_dir() else 0
    except Exception: return 0      # caught mid-write: not yet


def test_kill9_in_distill_then_rerun_equals_uninterrupted(tmp_path):
    ref = tmp_path / 'ref'
    _run(ref)
    assert set(p.stem for p in (ref / 'stages').glob('*.json')) == set(STAGES.split(','))
    killed = tmp_path / 'killed'
    _kill_when(killed, lambda o: _epoch(o) >= 2)                          # mid-training: some epochs checkpointed, not all
    assert not (killed / 'stages' / 'distill.json').exists() and (killed / 'stages' / 'teacher.json').exists()
    dry = _run(killed, '--dry-run').stdout
    assert re.search(r'distill\s+partial', dry) and re.search(r'teacher\s+done', dry), dry
    r = _run(killed)
    assert '[split] done already' in r.stdout and '[distill] resuming' in r.stdout, r.stdout
    a, b = load_file(str(ref / 'distill' / 'student.safetensors')), load_file(str(killed / 'distill' / 'student.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'the resumed student differs from the uninterrupted one'
    assert (ref / 'eval' / 'results.csv').read_text() == (killed / 'eval' / 'results.csv').read_text()
    assert (killed / 'report.md').exists() and 'Test top-1' in (killed / 'report.md').read_text()


def test_kill9_in_synthesis_then_rerun_resumes(tmp_path):
    out = tmp_path / 'run'
    _kill_when(out, lambda o: (o / 'synth' / 'manifest.jsonl').exists())    # the first batch of images is recorded, the rest is not
    assert not (out / 'stages' / 'synth.json').exists()
    r = _run(out, '--stages', 'split,synth')
    assert '[synth] resuming' in r.stdout
    summary = yaml.safe_load((out / 'stages' / 'synth.json').read_text())['summary']
    assert summary['images'] == 12 and summary['generated'] < 12, summary       # the killed run's images were kept


def test_cli_config_file_and_flags_agree(tmp_path):
    "A YAML file from --print-config, passed back, gives the same config; flags after it win; a stale stage stops with its setting."
    out = subprocess.run(RUN[:-5] + ['--data.k', '2', '--print-config', '--out', 'x'], env=ENV, capture_output=True, text=True, check=True).stdout
    f = tmp_path / 'my.yaml'; f.write_text(out)
    assert config_from_dict(RunConfig, read_config_file(f)) == preset_config('tiny', {'data': {'k': 2}})
    again = subprocess.run([sys.executable, '-m', 'sidclip_guide', 'run', str(f), '--seed', '3', '--print-config', '--out', 'x'],
                           env=ENV, capture_output=True, text=True, check=True).stdout
    assert config_from_dict(RunConfig, yaml.safe_load(again)) == preset_config('tiny', {'data': {'k': 2}, 'seed': 3})
    bad = subprocess.run([sys.executable, '-m', 'sidclip_guide', 'run', 'tiny', '--out', 'x', '--distill.lr', 'fast'], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and 'argument --distill.lr' in bad.stderr
    f.write_text(out.replace('distill:', 'distil:'))
    bad = subprocess.run([sys.executable, '-m', 'sidclip_guide', 'run', str(f), '--out', 'x', '--dry-run'], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "has no setting 'distil': did you mean distill?" in bad.stderr


SETTINGS = [RunConfig, DataConfig, SynthConfig, TeacherConfig, StudentConfig, DistillConfig, ProbeConfig, ExportConfig]


def _other(hint, v):
    "A value of type `hint` different from `v`."
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1: hint = args[0]
    if dataclasses.is_dataclass(hint): return _changed(v)
    if hint is bool: return not v
    if hint is int: return (v or 0) + 3
    if hint is float: return (v or 0.0) * 2 + 0.5
    if hint is str: return f'{v}-other'
    if (typing.get_origin(hint) or hint) is tuple:
        el = (typing.get_args(hint) or (str,))[0]
        return (7, 9) if el is int else ('alpha', 'beta')
    raise AssertionError(f'no test value for {hint}')


VALID = {'ExportConfig.format': 'onnx', 'ExportConfig.int8_format': 'qdq'}   # fields that __post_init__ checks: another valid value


def _changed(cfg):
    "`cfg` with every field changed (to another valid value where the dataclass checks it)."
    hints, name = typing.get_type_hints(type(cfg)), type(cfg).__name__
    return dataclasses.replace(cfg, **{f.name: VALID.get(f'{name}.{f.name}', _other(hints[f.name], getattr(cfg, f.name))) for f in dataclasses.fields(cfg)})


def _argv(cfg, prefix=''):
    "The flags that give `cfg`, as a user would type them."
    out, hints = [], typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), '--' + prefix + f.name.replace('_', '-')
        if dataclasses.is_dataclass(v): out += _argv(v, f'{prefix}{f.name}.')
        elif isinstance(v, bool): out.append(flag if v else '--no-' + flag[2:])
        elif isinstance(v, tuple): out += [flag, ','.join(map(str, v))]
        else: out += [flag, str(v)]
    return out


@pytest.mark.parametrize('cls', SETTINGS, ids=lambda c: c.__name__)
def test_every_settings_dataclass_round_trips_yaml_and_cli(cls, tmp_path):
    cfg = _changed(cls())
    assert cfg != cls()
    f = tmp_path / 'c.yaml'; f.write_text(config_yaml(cfg))
    assert config_from_dict(cls, read_config_file(f)) == cfg                          # YAML
    p = argparse.ArgumentParser(); config_arguments(p, cls)
    assert config_from_args(cls, p.parse_args(_argv(cfg))) == cfg                     # flags
    assert config_from_args(cls, p.parse_args([])) == cls()                           # no flags: the defaults


COMMANDS = [('synth', SynthConfig, ''), ('distill', DistillConfig, ''), ('distill', TeacherConfig, 'teacher.'), ('probe', ProbeConfig, ''),
            ('export', ExportConfig, ''), ('run', RunConfig, '')]


def _flags(cls, prefix='', docs=False):
    "(field, flag) of every field of `cls`, nested sections as `--section.field`; with `docs`, the field's comment too."
    from fastcore.docments import docments
    hints, dm = typing.get_type_hints(cls), docments(cls, full=True)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]): yield from _flags(hints[f.name], f'{prefix}{f.name}.', docs)
        else: yield (f.name, '--' + prefix + f.name.replace('_', '-')) + ((dm[f.name]['docment'],) if docs else ())


@pytest.mark.parametrize('cmd,cls,prefix', COMMANDS, ids=lambda x: getattr(x, '__name__', x))
def test_each_setting_is_declared_once(cmd, cls, prefix):
    "Every field is a flag of its command, with the field's comment as help; no module declares such a flag by hand."
    sub = build_parser(cmd)._subparsers._group_actions[0].choices[cmd]
    opts = {o for a in sub._actions for o in a.option_strings}
    skip = {'out_dir', 'progress'} if cls is DistillConfig else set()
    missing = [fl for name, fl in _flags(cls, prefix) if name not in skip and fl not in opts]
    assert not missing, f'{cmd}: no flag for {missing}'
    helps = {o: a.help for a in sub._actions for o in a.option_strings}
    by_hand = [fl for name, fl, doc in _flags(cls, prefix, docs=True) if name not in skip and not (helps[fl] or '').startswith(doc)]
    assert not by_hand, f'{cmd}: flags not derived from {cls.__name__} (their help is not the field comment): {by_hand}'


@pytest.mark.parametrize('k', [2, 4])
def test_dry_run_numbers_are_what_the_run_does(tmp_path, capsys, k):
    "`sidclip run tiny --dry-run` predicts the distill stage's images, optimizer steps and training samples; the run then does exactly that (2 and 4 shots differ)."
    from sidclip_guide.cli import main
    from sidclip_guide.distill import read_metrics
    args = ['run', 'tiny', '--stages', 'split,synth,teacher,distill', '--data.k', str(k), '--out', str(tmp_path / 'run'), '--quiet']
    assert main([*args, '--dry-run']) == 0
    plan = re.search(r'student: (\d+) training images, (\d+) optimizer steps, (\d+) training samples', capsys.readouterr().out)
    assert plan, 'no student line in the plan'
    images, steps, samples = map(int, plan.groups())
    assert samples == 2 * (3 * (4 + k))                         # 2 epochs of 3 classes x (4 synthetic + k shots)
    assert main(args) == 0
    rows = read_metrics(tmp_path / 'run' / 'distill' / 'metrics.jsonl')
    summary = yaml.safe_load((tmp_path / 'run' / 'stages' / 'distill.json').read_text())['summary']
    assert (images, steps, samples) == (summary['images'], rows[-1]['step'], sum(r['samples'] for r in rows))
