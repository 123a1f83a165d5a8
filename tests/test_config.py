"""Recipe schema: every recipe validates, overrides work, typos exit 2 naming the nearest key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lftk.cli import app, main
from lftk.config import Recipe, load_recipe, parse_overrides
from lftk.errors import ConfigError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_found():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "stage2.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_validates_and_documents_its_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} must start with a comment"
    assert f"lftk train recipes/{path.relative_to(path.parents[0]).as_posix()}" in path.read_text() or (
        f"lftk train {path.relative_to(path.parents[1]).as_posix()}" in path.read_text()
    ), f"{path} must show the command that runs it"


def test_stage2_is_the_papers_setup():
    r = load_recipe(RECIPES[[p.name for p in RECIPES].index("stage2.yaml")])
    assert r.model.base == "timbrooks/instruct-pix2pix"
    assert (r.train.resolution, r.train.batch_size, r.train.lr, r.train.weight_decay) == (128, 8, 1e-4, 0.01)
    assert (r.train.optimizer, r.train.precision, r.train.epochs, r.train.trainable) == ("adamw", "fp16", 10, "lora")


def test_overrides_dotted_and_split_on_first_equals(tmp_path):
    demo = Path(__file__).parent.parent / "recipes" / "demo.yaml"
    r = load_recipe(demo, ["train.lr=3e-4", "max_steps=7", "data.prompt_template=a=b '{instruction}'"])
    assert r.train.lr == 3e-4 and r.max_steps == 7
    assert r.data.prompt_template == "a=b '{instruction}'"
    tree, problems = parse_overrides(["x.y=1=2", "noequals"])
    assert tree == {"x": {"y": "1=2"}} and len(problems) == 1


def test_all_errors_reported_at_once_with_suggestions():
    demo = Path(__file__).parent.parent / "recipes" / "demo.yaml"
    with pytest.raises(ConfigError) as info:
        load_recipe(demo, ["train.lrr=1", "max_step=3", "train.trainable=half", "train.resolution=63"])
    text = str(info.value)
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in text
    assert "max_step: unknown key; did you mean 'max_steps'?" in text
    assert "train.trainable" in text and "train.resolution" in text
    assert len(info.value.problems) == 4


def test_typo_in_recipe_file_exits_2(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# lftk train bad.yaml\nseed: 0\noutput_dir: r\nmax_steps: 1\ndata: {path: p}\nmodel: {base: b}\ntrain: {batchsize: 2}\n")
    monkeypatch.setattr("sys.argv", ["lftk", "train", str(bad)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "train.batchsize" in err and "train.batch_size" in err


def test_extends_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_null_removes_an_inherited_mapping(tmp_path):
    peft = Path(__file__).resolve().parent.parent / "recipes" / "stage2-peft.yaml"
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {peft}\ntrain:\n  cache_latents: true\n  lora:\n    parts:\n      vae_tail: null\n")
    recipe = load_recipe(child)
    assert set(recipe.train.lora.parts) == {"self_attn_coarse"} and recipe.train.cache_latents
    # On the command line too; and a null over a plain value is just null (an Optional key).
    recipe = load_recipe(peft, ["train.lora.parts.self_attn_coarse=null", "train.val_every=null"])
    assert set(recipe.train.lora.parts) == {"vae_tail"} and recipe.train.val_every is None


COMMANDS = [
    ["data", "sim"], ["data", "import"], ["data", "pairs"], ["data", "inspect"], ["init-base"], ["train"],
    ["eval"], ["export"], ["infer"], ["bench"], ["doctor"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_example(cmd):
    result = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: lftk " + " ".join(cmd) in " ".join(result.output.split())
