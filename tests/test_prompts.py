"""Covering-array guarantees of `sidclip_guide.prompts` over many random dimension sets, and prompt sets per built-in dataset."""
import itertools, json, random

import pytest

from sidclip_guide.utils import SidclipError
from sidclip_guide.prompts import (BUILTIN_DIMENSIONS, PromptConfig, ContextDimension, build_prompts, builtin_config,
                                   covering_array, covering_gaps, llm_options, load_dimensions, text_prompts, weighted_name)


def random_dims(rng, n_dims, max_opts=7):
    return {f'dim {i}': [f'o{i}_{j}' for j in range(rng.randint(1, max_opts))] for i in range(n_dims)}


@pytest.mark.parametrize('seed', range(12))
def test_pairwise_covers_every_pair(seed):
    rng = random.Random(seed)
    dims = random_dims(rng, rng.randint(0, 6))
    rows = covering_array(dims, strength=2, seed=seed)
    assert covering_gaps(rows, dims, 2) == []
    assert all(list(r) == list(dims) and all(r[k] in dims[k] for k in dims) for r in rows)
    full = 1
    for o in dims.values(): full *= len(o)
    assert len(rows) <= full                                   # never more than the product
    sizes = sorted((len(o) for o in dims.values()), reverse=True)
    if len(sizes) >= 2: assert len(rows) >= sizes[0] * sizes[1]  # the lower bound of any pairwise array


def test_far_fewer_rows_than_product():
    dims = {f'd{i}': [f'{i}{j}' for j in range(5)] for i in range(6)}       # 5^6 = 15,625 combinations
    rows = covering_array(dims)
    assert covering_gaps(rows, dims) == [] and len(rows) <= 45
    r3 = covering_array({k: v for k, v in list(dims.items())[:4]}, strength=3)
    assert covering_gaps(r3, {k: v for k, v in list(dims.items())[:4]}, 3) == [] and len(r3) < 5**4


def test_gaps_detects_missing_pair():
    dims = {'a': ['1', '2'], 'b': ['x', 'y'], 'c': ['p']}
    rows = covering_array(dims)
    assert covering_gaps(rows[:-1], dims)                       # dropping a row loses a pair
    with pytest.raises(SidclipError, match='strength'): covering_array(dims, strength=0)


@pytest.mark.parametrize('dataset', sorted(BUILTIN_DIMENSIONS))
def test_builtin_datasets_give_distinct_weighted_prompts(dataset):
    cfg = builtin_config(dataset, negative_prompt='lowres')
    ps = build_prompts('Abyssinian (cat)', cfg)
    assert len(ps) == len({p.prompt for p in ps}) >= 12
    name = weighted_name('Abyssinian (cat)', cfg.classname_weight)        # Table 5: 1.5 pets, 1.2 flowers/food, 1.0 cars
    assert all(name in p.prompt and p.negative_prompt == 'lowres' for p in ps)
    # every option of every dimension is used
    for d in cfg.dimensions:
        for o in d.options: assert any(d.render(o) in p.prompt for p in ps), (d.name, o)
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_user_dimensions_and_llm_stub(tmp_path):
    f = tmp_path/'d.json'
    f.write_text(json.dumps({'location': {'options': ['a lake', 'a city'], 'template': 'near {}'}, 'time': ['dawn', 'dusk']}))
    cfg = PromptConfig(load_dimensions(f), classname_weight=2.0, template='a close photo of a {classname}')
    ps = build_prompts('heron', cfg)
    assert len(ps) == 4 and all(p.prompt.startswith('a close photo of a (heron)2, near a ') for p in ps)
    stub = lambda msgs, **kw: [{'generated_text': msgs + [{'role': 'assistant', 'content': '1. on a lake\n2. in a marsh\n3. in a marsh'}]}]
    cfg.dimensions.append(ContextDimension('habitat', llm_options('habitat', 'bird', 5, pipeline=stub)))
    assert cfg.dimensions[-1].options == ['on a lake', 'in a marsh']
    assert len(build_prompts('heron', cfg)) == 4                # 2x2x2 with t=2 covers in 4 rows
    with pytest.raises(SidclipError, match='needs a'): load_dimensions({'x': {'options': ['a'], 'template': 'no slot'}})
    assert [p.prompt for p in text_prompts('heron', ['a photo of a {c}', 'a {c} in the wild'])] == ['a photo of a heron', 'a heron in the wild']
    assert weighted_name('a', 1) == 'a'


@pytest.mark.parametrize('var', ['HF_HUB_OFFLINE', 'SIDCLIP_OFFLINE'])
def test_llm_offline_fails_fast(monkeypatch, var):
    "Offline, an LLM that is not on disk is a clear `SidclipError` at once (no minute of hub retries)."
    import time
    for v in ('HF_HUB_OFFLINE', 'SIDCLIP_OFFLINE'): monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, '1')
    from transformers import pipeline  # noqa: F401  (import time is not what this test measures)
    t0 = time.time()
    with pytest.raises(SidclipError, match="Could not load the LLM 'sidclip-test/no-such-llm'"):
        llm_options('location', 'flower', model_id='sidclip-test/no-such-llm')
    assert time.time() - t0 < 30   # at once, not after a minute of hub retries (generous: CI machines are busy)
