"Recipe files: each is a valid TrainConfig, states its measured result, and the README shows how to reproduce it."
from pathlib import Path

import pytest

from retail_cv.core import parse_model, read_yaml
from retail_cv.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT/'recipes').glob('*.yaml'))


def test_there_are_recipes(): assert RECIPES, 'recipes/ holds no recipe'


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.name)
def test_recipe_is_a_train_config(path):
    cfg = parse_model(TrainConfig, read_yaml(path, 'training recipe'))
    assert cfg.max_minutes, 'a recipe states its time budget'


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.name)
def test_recipe_states_its_result_and_the_readme_reproduces_it(path):
    text = path.read_text()
    assert '# Measured' in text and 'bench/results/' in text, f'{path.name}: say what it measured and where the JSON is'
    assert f'recipes/{path.name}' in (ROOT/'README.md').read_text(), f'the README shows no command for {path.name}'


def test_the_default_detector_is_the_measured_shelf_recipe():
    "`retail-cv train detect` with only a budget trains exactly what recipes/shelf-tags-fcos_tiny-5min.yaml measured."
    recipe = parse_model(TrainConfig, read_yaml(ROOT/'recipes'/'shelf-tags-fcos_tiny-5min.yaml', 'training recipe'))
    budget = {k: getattr(recipe, k) for k in ('max_minutes', 'schedule_clock', 'epochs', 'sample_predictions')}
    default = TrainConfig(task='detection', **budget)
    differ = {k: (getattr(default, k), getattr(recipe, k)) for k in TrainConfig.model_fields if getattr(default, k) != getattr(recipe, k)}
    assert not differ, f'the default detection config and the recipe differ in (default, recipe): {differ}'
