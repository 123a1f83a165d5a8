"""Several horizons in one pair dir: drawn per pair, stated in the prompt, refused without {horizon},
recorded in lftk_model.json, and each pair's own horizon in training and evaluation prompts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from lftk.cli import main
from lftk.config import DataConfig
from lftk.data.pairs import draw_horizons, make_pairs, pair_starts, parse_horizons
from lftk.data.pairset import PairSet, format_prompt, template_fields
from lftk.errors import LftkError
from test_pairs import write_fake_episodes  # the same fake episodes as the pair tests

HORIZONS = (5, 10, 20)
FRAMES = 30
TEMPLATE = "Scene {horizon} frames after '{instruction}'"


@pytest.fixture(scope="module")
def episodes_root(tmp_path_factory) -> Path:
    return write_fake_episodes(tmp_path_factory.mktemp("episodes"), episodes=3, frames=FRAMES, size=16)


def _prompts(out: Path) -> dict[str, dict]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text()) for p in sorted(out.glob("*/*/prompt.json"))}


def _run_cli(monkeypatch, *argv) -> int:
    monkeypatch.setattr("sys.argv", ["lftk", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code or 0


# ---------------------------------------------------------------------------------------- pairs


def test_several_horizons_one_per_pair_deterministic_and_at_its_offset(episodes_root, tmp_path):
    a = make_pairs(episodes_root, tmp_path / "a", horizon="20,5,10", stride=2, seed=3)
    b = make_pairs(episodes_root, tmp_path / "b", horizon=[5, 10, 20], stride=2, seed=3)
    single = make_pairs(episodes_root, tmp_path / "single", horizon=5, stride=2, seed=3)
    assert a["horizons"] == list(HORIZONS) and "horizon" not in a  # a mix is never mistaken for one offset
    assert (b["horizons"], b["per_horizon"], b["counts"]) == (a["horizons"], a["per_horizon"], a["counts"])  # any spelling
    assert single["horizon"] == 5 and single["horizons"] == [5]
    # One pair per start frame that fits the shortest horizon: as many as with that horizon alone.
    assert a["n_pairs"] == single["n_pairs"] == 2 * 3 * len(pair_starts(FRAMES, 5, 2))
    assert sum(sum(c.values()) for c in a["per_horizon"].values()) == a["n_pairs"]

    prompts = _prompts(tmp_path / "a")
    assert prompts == _prompts(tmp_path / "b")  # same seed, same pairs
    assert len(prompts) == a["n_pairs"]
    seen = set()
    for key, p in prompts.items():
        h = p["horizon"]
        seen.add(h)
        assert h in HORIZONS and p["future_frame"] == p["frame"] + h and p["future_frame"] < FRAMES
        # The future image is the episode's frame at frame + horizon (JPEGs are copied byte for byte).
        src = Path(p["source_episode_dir"]) / f"{p['frame'] + h}.jpg"
        assert (tmp_path / "a" / key / "000000_1.jpg").read_bytes() == src.read_bytes()
    assert seen == set(HORIZONS)
    # Late start frames draw only among the horizons that fit: from frame 20 on, only 5 (20 + 10 is past frame 29).
    assert all(p["horizon"] == 5 for p in prompts.values() if p["frame"] >= FRAMES - 10)

    make_pairs(episodes_root, tmp_path / "c", horizon="5,10,20", stride=2, seed=4)
    assert [p["horizon"] for p in _prompts(tmp_path / "c").values()] != [p["horizon"] for p in prompts.values()]


def test_horizon_draw_of_an_episode_ignores_the_others(episodes_root):
    from lftk.data.episodes import list_episodes

    eps = list_episodes(episodes_root)
    assert draw_horizons(eps[1], HORIZONS, 2, seed=0) == draw_horizons(eps[1], HORIZONS, 2, seed=0)
    assert [h for _, h in draw_horizons(eps[0], HORIZONS, 2, 0)] != [h for _, h in draw_horizons(eps[1], HORIZONS, 2, 0)]


def test_bad_horizon_lists_are_user_errors(episodes_root, tmp_path, monkeypatch, capsys):
    assert parse_horizons("100") == (100,) and parse_horizons(" 50, 25 ,100") == (25, 50, 100)
    for bad in ("0", "5,-1", "a,b", "", "5,5", "5.5"):
        with pytest.raises(LftkError, match="horizon"):
            parse_horizons(bad)
    with pytest.raises(LftkError, match=r"longer than the horizon \(35 frames\)"):
        make_pairs(episodes_root, tmp_path / "o", horizon="50,35")
    assert _run_cli(monkeypatch, "data", "pairs", str(episodes_root), str(tmp_path / "x"), "--horizon", "10,x") == 2
    assert "--horizon '10,x'" in capsys.readouterr().err
    assert _run_cli(monkeypatch, "data", "pairs", str(episodes_root), str(tmp_path / "cli"), "--horizon", "5,20", "--stride", "4") == 0
    summary = json.loads((tmp_path / "cli" / "pairs.json").read_text())
    assert summary["horizons"] == [5, 20] and set(summary["per_horizon"]) == {"5", "20"}


# ------------------------------------------------------------------------------------ prompts


def test_format_prompt_with_and_without_horizon():
    assert format_prompt("{instruction}", "stack") == "stack"
    assert format_prompt("{instruction}", "stack", 100) == "stack"  # a horizon the template does not use is fine
    assert format_prompt(TEMPLATE, "stack", 25) == "Scene 25 frames after 'stack'"
    assert template_fields(TEMPLATE) == {"instruction", "horizon"}
    with pytest.raises(LftkError, match=r"uses \{horizon\}, but runs/x/prompt.json has no horizon") as info:
        format_prompt(TEMPLATE, "stack", source="runs/x/prompt.json")
    assert TEMPLATE in str(info.value)
    with pytest.raises(LftkError, match="this prompt has no horizon"):
        format_prompt(TEMPLATE, "stack")
    for bad, why in (("{task}: {instruction}", r"unknown field\(s\) \['task'\]"), ("{0} {instruction}", "unknown"),
                     ("{instruction", "brace"), ("{instruction:d}", "format code")):
        with pytest.raises(LftkError, match=why):
            format_prompt(bad, "stack", 10)


def test_recipe_template_may_state_the_horizon():
    assert DataConfig(path="p", prompt_template=TEMPLATE).prompt_template == TEMPLATE
    for bad, why in (("{task} {instruction}", "unknown field"), ("{horizon} frames", "must contain '{instruction}'"),
                     ("{{instruction}}", "must contain")):
        with pytest.raises(ValueError, match=why):
            DataConfig(path="p", prompt_template=bad)


# ------------------------------------------------------------------------------ pair dirs for training


def _mixed_pair_dir(src: Path, dst: Path, horizons=(10, 20), drop: str | None = None) -> Path:
    """tiny_pairs_dir with its samples' horizons alternating over `horizons`; `drop`: a sample without one."""
    shutil.copytree(src, dst)
    for split in ("train", "val", "test"):
        for k, prompt_file in enumerate(sorted((dst / split).glob("*/prompt.json"))):
            prompt = json.loads(prompt_file.read_text())
            prompt["horizon"] = horizons[k % len(horizons)]
            if f"{split}/{prompt_file.parent.name}" == drop:
                del prompt["horizon"]
            prompt_file.write_text(json.dumps(prompt))
    (dst / "pairs.json").write_text(json.dumps({"horizons": sorted(horizons)}))
    return dst


@pytest.fixture(scope="module")
def mixed_pairs(tiny_pairs_dir, tmp_path_factory) -> Path:
    return _mixed_pair_dir(tiny_pairs_dir, tmp_path_factory.mktemp("mixed") / "pairs")


def test_pairset_keeps_a_horizon_column(mixed_pairs, tmp_path):
    ps = PairSet(mixed_pairs, "train")
    assert ps.horizons() == [10, 20] and [ps.horizon(i) for i in range(4)] == [10, 20, 10, 20]
    assert ps._horizon.dtype.name == "int32" and ps.without_horizon() == []
    assert ps.format(1, TEMPLATE) == "Scene 20 frames after 'stack blocks'" == ps[1].format(TEMPLATE)
    assert ps[1].horizon == 20

    dropped = _mixed_pair_dir(mixed_pairs, tmp_path / "dropped", drop="train/task__episode3__f0000")
    ps = PairSet(dropped, "train")
    assert ps.without_horizon() == [3] and ps.horizon(3) is None and ps.horizons() == [10, 20]
    with pytest.raises(LftkError, match="task__episode3__f0000/prompt.json has no horizon"):
        ps.format(3, TEMPLATE)
    bad = dropped / "train" / "task__episode1__f0000" / "prompt.json"
    bad.write_text(json.dumps({"instruction": "x", "horizon": "10s"}))
    with pytest.raises(LftkError, match="task__episode1__f0000.*'horizon' is '10s'"):
        PairSet(dropped, "train")


def test_dataset_token_ids_follow_each_pairs_horizon(mixed_pairs, tiny_pipeline_dir):
    from transformers import CLIPTokenizer

    from lftk.train.data import PairDataset, check_prompts

    tok = CLIPTokenizer.from_pretrained(str(tiny_pipeline_dir / "tokenizer"))
    ps = PairSet(mixed_pairs, "train")
    check_prompts(TEMPLATE, ps, PairSet(mixed_pairs, "val"))
    ds = PairDataset(ps, 64, tok, TEMPLATE)
    ids = [ds[i]["input_ids"] for i in range(3)]  # horizons 10, 20, 10
    assert not ids[0].equal(ids[1]) and ids[0].equal(ids[2])
    assert "20frames" in tok.decode(ids[1], skip_special_tokens=True).replace(" ", "")
    plain = PairDataset(ps, 64, tok, "{instruction}")
    assert plain[0]["input_ids"].equal(plain[1]["input_ids"])  # what check_prompts refuses to train on


def test_check_prompts_refuses_mixed_horizons_without_the_field(mixed_pairs, tmp_path):
    from lftk.train.data import check_prompts

    train, val = PairSet(mixed_pairs, "train"), PairSet(mixed_pairs, "val")
    with pytest.raises(LftkError, match=r"horizons \[10, 20\].*data.prompt_template '\{instruction\}'"):
        check_prompts("{instruction}", train, val)
    check_prompts("{instruction}", PairSet(_one_horizon(mixed_pairs, tmp_path), "train"), None)
    dropped = _mixed_pair_dir(mixed_pairs, tmp_path / "dropped", drop="val/task__episode1__f0000")
    with pytest.raises(LftkError, match=r"val/task__episode1__f0000/prompt.json: no 'horizon'.*1 of 2 pairs"):
        check_prompts(TEMPLATE, PairSet(dropped, "train"), PairSet(dropped, "val"))


def _one_horizon(src: Path, tmp_path: Path) -> Path:
    return _mixed_pair_dir(src, tmp_path / "one", horizons=(10,))


# ---------------------------------------------------------------------------------------- training


def _train(monkeypatch, run: Path, pairs: Path, base: Path, *extra: str) -> int:
    return _run_cli(monkeypatch, "train", "recipes/demo.yaml", f"output_dir={run}", f"data.path={pairs}",
                    f"model.base={base}", "max_steps=2", "train.batch_size=2", "train.warmup_steps=0", *extra)


def test_training_refuses_mixed_horizons_without_horizon_in_template(mixed_pairs, tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    assert _train(monkeypatch, tmp_path / "r", mixed_pairs, tiny_pipeline_dir) == 2
    err = capsys.readouterr().err
    assert "data.prompt_template" in err and "[10, 20]" in err and "{horizon}" in err
    assert not (tmp_path / "r").exists(), "a refused run must leave no run dir behind"


def test_mixed_horizon_run_records_its_horizons(mixed_pairs, tiny_pipeline_dir, tmp_path, monkeypatch):
    run = tmp_path / "r"
    assert _train(monkeypatch, run, mixed_pairs, tiny_pipeline_dir, f"data.prompt_template={TEMPLATE}",
                  "train.val_samples=2") == 0
    meta = json.loads((run / "final" / "lftk_model.json").read_text())
    assert meta["horizons"] == [10, 20] and meta["horizon"] is None and meta["prompt_template"] == TEMPLATE
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_psnr" in r for r in rows)  # val metrics ran with the horizon in each prompt


# -------------------------------------------------------------------------------------- evaluation


def test_eval_prompts_carry_each_pairs_horizon(mixed_pairs, tmp_path, caplog):
    from lftk.eval.evaluate import _check_horizons
    from lftk.eval.methods import EvalSettings, make_items

    settings = EvalSettings(resolution=32, prompt_template=TEMPLATE, steps=1, guidance=1.0, image_guidance=1.0,
                            seed=0, batch_size=2, device="cpu")
    pairs = list(PairSet(mixed_pairs, "test"))
    assert [it.prompt for it in make_items(pairs, settings)] == [
        "Scene 10 frames after 'stack blocks'", "Scene 20 frames after 'stack blocks'"]
    with caplog.at_level(logging.WARNING):
        _check_horizons(pairs, TEMPLATE, {"horizons": [10, 20]})
        assert "not trained on" not in caplog.text
        _check_horizons(pairs, TEMPLATE, {"horizon": 10, "horizons": [10]})
    assert "horizon(s) [20] the model was not trained on" in caplog.text
    dropped = _mixed_pair_dir(mixed_pairs, tmp_path / "dropped", drop="test/task__episode0__f0000")
    with pytest.raises(LftkError, match="test/task__episode0__f0000/prompt.json has no horizon"):
        _check_horizons(list(PairSet(dropped, "test")), TEMPLATE, {})


def test_report_lists_horizons_in_numeric_order():
    from lftk.eval.report import _groups

    rows = [{"horizon": h} for h in (100, 25, None, 50, 25)]
    groups = _groups(rows, lambda r: r["horizon"])
    assert list(groups) == ["25", "50", "100", "None"] and len(groups["25"]) == 2
