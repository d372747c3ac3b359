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
