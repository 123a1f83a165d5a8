"""LoRA per part: strict recipe validation, per-module ranks, a VAE-encoder tail that trains (and only
the encoder), stock peft/diffusers loaders that reproduce final/, merge, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lftk.cli import main
from lftk.config import load_recipe
from lftk.errors import ConfigError, LftkError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEMO = RECIPES / "demo.yaml"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PARTS = (
    "train.lora.parts={self_attn: {component: unet, targets: [attn1.to_q, attn1.to_v], rank: 2, alpha: 6}, "
    "vae_tail: {component: vae_encoder, targets: [encoder.mid_block.*, encoder.conv_out, quant_conv], "
    "rank: 3, alpha: 3, dropout: 0.1}}"
)
LORA = ("train.trainable=lora", "train.lora.rank=4", "train.lora.alpha=8", PARTS)


def _tiny():
    from lftk.model.components import build_components

    parts = build_components("tiny", seed=0)
    return parts["unet"], parts["vae"]


# ------------------------------------------------------------------ recipe validation


def test_part_errors_name_their_key_paths_all_at_once():
    bad = ("train.lora.parts={sa: {component: unet, targets: [attn1.to_q], rnak: 4}, "
           "tail: {component: vae, targets: [quant_conv]}, empty: {component: unet, targets: []}}")
    with pytest.raises(ConfigError) as info:
        load_recipe(DEMO, ["train.trainable=lora", bad, "train.lora.parts.x.component=unet"])
    text = str(info.value)
    assert "train.lora.parts.sa.rnak: unknown key; did you mean 'train.lora.parts.sa.rank'?" in text
    assert "train.lora.parts.tail.component: Input should be 'unet' or 'vae_encoder'" in text
    assert "train.lora.parts.empty.targets: must name at least one module pattern" in text
    assert "train.lora.parts.x.targets: required key is missing" in text
    assert len(info.value.problems) == 4

    with pytest.raises(ConfigError, match="'default' is the part of train.lora.targets"):
        load_recipe(DEMO, ["train.trainable=lora", "train.lora.parts={default: {component: unet, targets: [x]}}"])


def test_parts_must_fit_the_training_setup():
    tail = "train.lora.parts={tail: {component: vae_encoder, targets: [quant_conv]}}"
    with pytest.raises(ConfigError, match=r"train.cache_latents: true, but train.lora.parts.tail trains the VAE encoder"):
        load_recipe(DEMO, ["train.trainable=lora", tail])
    with pytest.raises(ConfigError, match=r"train.lora.parts \(tail\) need train.trainable: lora"):
        load_recipe(DEMO, ["train.trainable=full", "train.cache_latents=false", tail])
    with pytest.raises(ConfigError, match="no UNet part"):
        load_recipe(DEMO, ["train.trainable=lora", "train.cache_latents=false", "train.lora.targets=[]", tail])
    ok = load_recipe(DEMO, ["train.trainable=lora", "train.cache_latents=false", "train.lora.rank=8", tail])
    parts = ok.train.lora.resolved_parts()
    assert parts["default"].component == "unet" and parts["tail"].rank == 8  # defaults from the top level
    assert ok.train.vae_encoder_trains


def test_peft_recipe_resolves_on_sd15_and_counts_the_encoder():
    from lftk.train.lora_parts import assign, summary
    from lftk.train.memory import _configs, _encoder_activation_bytes, _meta_models, estimate

    peft, plain = load_recipe(RECIPES / "stage2-peft.yaml"), load_recipe(RECIPES / "stage2.yaml")
    unet, vae, _ = _meta_models(*_configs(peft)[1:])
    by_part = {**summary(assign(peft.train.lora, "unet", unet)), **summary(assign(peft.train.lora, "vae_encoder", vae))}
    assert {k: (v["rank"], v["modules"]) for k, v in by_part.items()} == {
        "default": (16, 64), "self_attn_coarse": (8, 16), "vae_tail": (4, 10)}
    est, base = estimate(peft), estimate(plain)
    rows = {name: gib for name, gib, _ in est.rows}
    assert rows["VAE encoder activations"] > 0 and "VAE encoder activations" not in {r[0] for r in base.rows}
    assert est.trainable > base.trainable
    # Autograd keeps what lies downstream of the first adapted layer: a tail that starts at the encoder's
    # first layer keeps far more than the recipe's.
    first = load_recipe(RECIPES / "stage2-peft.yaml", ["train.lora.parts.vae_tail.targets=[encoder.conv_in]"])
    whole = _encoder_activation_bytes(vae, first, torch.float16, assign(first.train.lora, "vae_encoder", vae))
    assert whole / 2**30 > 5 * rows["VAE encoder activations"]


# ------------------------------------------------------------------ adapters on the tiny model


def test_per_part_ranks_land_on_their_modules():
    from peft.tuners.lora import LoraLayer

    from lftk.config import LoraConfig
    from lftk.train.lora import add_lora, add_vae_lora
    from lftk.train.lora_parts import assign, lora_param_count

    unet, vae = _tiny()
    cfg = LoraConfig(rank=4, alpha=8, parts={
        "self_attn": {"component": "unet", "targets": ["attn1.to_q", "attn1.to_v"], "rank": 2, "alpha": 6, "dropout": 0.2},
        "tail": {"component": "vae_encoder", "targets": ["encoder.mid_block.*", "conv_out", "quant_conv"], "rank": 3}})
    expected = lora_param_count(unet, assign(cfg, "unet", unet)) + lora_param_count(vae, assign(cfg, "vae_encoder", vae))
    add_lora(unet, cfg)
    add_vae_lora(vae, cfg)

    def adapted(model):  # layer name -> (rank, scale, dropout kind)
        return {n: (m.r["default"], m.scaling["default"], type(m.lora_dropout["default"]).__name__)
                for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    on_unet, on_vae = adapted(unet), adapted(vae)
    by_tail = {}
    for name, got in on_unet.items():
        by_tail.setdefault(".".join(name.split(".")[-2:]), set()).add(got)
    assert by_tail == {
        **{f"attn2.{p}": {(4, 2.0, "Identity")} for p in ("to_q", "to_k", "to_v")},  # default part: rank 4, alpha 8
        "to_out.0": {(4, 2.0, "Identity")},
        "attn1.to_q": {(2, 3.0, "Dropout")}, "attn1.to_v": {(2, 3.0, "Dropout")},  # self_attn: rank 2, alpha 6
    }
    assert set(on_vae) == {  # conv_out: the encoder's only (the decoder never trains)
        "encoder.mid_block.resnets.0.conv1", "encoder.mid_block.resnets.0.conv2", "encoder.mid_block.resnets.1.conv1",
        "encoder.mid_block.resnets.1.conv2", "encoder.conv_out", "quant_conv"}
    assert set(on_vae.values()) == {(3, 8 / 3, "Identity")}  # rank from the part, alpha from the top level
    trainable = sum(p.numel() for m in (unet, vae) for p in m.parameters() if p.requires_grad)
    assert trainable == expected, "the dry-run's LoRA parameter count must equal what peft creates"


def test_patterns_that_match_nothing_or_twice_are_errors():
    from lftk.config import LoraConfig
    from lftk.train.lora_parts import assign

    unet, vae = _tiny()
    cfg = LoraConfig(targets=["attn2.to_q", "attn2.to_qq"], parts={"sa": {"component": "unet", "targets": ["attn2.to_*"]}})
    with pytest.raises(LftkError) as info:
        assign(cfg, "unet", unet)
    text = str(info.value)
    assert "train.lora.targets: 'attn2.to_qq' matches no UNet Linear/Conv2d layer (nearest: attn2.to_q" in text
    assert "train.lora.parts.sa.targets: 'attn2.to_*' matches" in text and "already in part 'default'" in text
    dec = LoraConfig(parts={"tail": {"component": "vae_encoder", "targets": ["decoder.conv_out"]}})
    with pytest.raises(LftkError, match=r"train.lora.parts.tail.targets: 'decoder.conv_out' matches no VAE encoder"):
        assign(dec, "vae_encoder", vae)


# ------------------------------------------------------------------ training with a VAE-encoder part


def _train(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["lftk", "train", str(DEMO), *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code


def _run_args(run, pairs, base, *extra):
    return (f"output_dir={run}", f"data.path={pairs}", f"model.base={base}", "max_steps=4", "train.batch_size=2",
            "train.lr=1e-2", "train.warmup_steps=0", "train.cache_latents=false", "train.checkpoint_every=2",
            "train.val_samples=0", *LORA, *extra)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, tiny_pipeline_dir, tiny_pairs_dir):
    run = tmp_path_factory.mktemp("vae_run") / "r"
    mp = pytest.MonkeyPatch()
    code = _train(mp, *_run_args(run, tiny_pairs_dir, tiny_pipeline_dir))
    mp.undo()
    assert code in (0, None)
    return run


def test_training_changes_the_encoder_tail_only(vae_run, tiny_pipeline_dir):
    trained, base = load_file(vae_run / "final/vae" / WEIGHTS), load_file(tiny_pipeline_dir / "vae" / WEIGHTS)
    assert trained.keys() == base.keys(), "final/vae must be a plain (merged) VAE"
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed, "the VAE encoder's adapters learned nothing"
    tail = ("encoder.mid_block.", "encoder.conv_out.", "quant_conv.")
    assert all(k.startswith(tail) for k in changed), sorted(changed)
    assert not any(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    meta = json.loads((vae_run / "final/lftk_model.json").read_text())
    parts = meta["lora"]["resolved_parts"]
    assert {k: (v["component"], v["rank"], v["alpha"], v["modules"]) for k, v in parts.items()} == {
        "default": ("unet", 4, 8.0, 16), "self_attn": ("unet", 2, 6.0, 8), "vae_tail": ("vae_encoder", 3, 3.0, 6)}
    assert parts["vae_tail"]["adapter"] == "lora/vae_encoder" and parts["vae_tail"]["dropout"] == 0.1


def test_stock_loaders_reproduce_the_merged_unet_and_vae(vae_run, tiny_pipeline_dir):
    from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline
    from peft import PeftModel

    final = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(vae_run / "final"), safety_checker=None)
    base = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    x, t, e = torch.randn(1, 8, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        base.load_lora_weights(str(vae_run / "final" / "lora"))  # per-module ranks from the saved peft config
        assert torch.allclose(base.unet(x, t, e).sample, final.unet(x, t, e).sample, atol=1e-4)
        # The VAE adapter, with stock peft, as lftk.train.lora's docstring tells users to load it.
        vae = PeftModel.from_pretrained(AutoencoderKL.from_pretrained(str(tiny_pipeline_dir / "vae")),
                                        str(vae_run / "final/lora/vae_encoder"))
        adapted = vae.encode(img).latent_dist.mean
        merged = final.vae.encode(img).latent_dist.mean
        plain = base.vae.encode(img).latent_dist.mean
    assert (merged - plain).abs().max() > 1e-5, "the encoder's adapters changed nothing"
    assert torch.allclose(adapted, merged, atol=1e-5)
    folded = vae.merge_and_unload().state_dict()
    assert max((folded[k] - final.vae.state_dict()[k]).abs().max().item() for k in folded) < 1e-5


def test_merge_rebuilds_unet_and_vae_from_the_adapters(vae_run, tmp_path):
    from lftk.export.merge import merge_run

    result = merge_run(vae_run, tmp_path / "merged")
    assert result.merged and result.max_abs_diff <= 1e-4 and "UNet and VAE" in result.message
    ours, final = load_file(tmp_path / "merged/vae" / WEIGHTS), load_file(vae_run / "final/vae" / WEIGHTS)
    assert max((ours[k] - final[k]).abs().max().item() for k in final) <= 1e-4
    meta = json.loads((tmp_path / "merged/lftk_model.json").read_text())
    assert meta["merged_lora"]["vae_adapter"].endswith("lora/vae_encoder")


def test_resume_with_a_vae_part_is_bit_identical(vae_run, tmp_path, monkeypatch, tiny_pipeline_dir, tiny_pairs_dir):
    run = tmp_path / "resumed"
    assert _train(monkeypatch, *_run_args(run, tiny_pairs_dir, tiny_pipeline_dir, "max_steps=2")) in (0, None)
    assert _train(monkeypatch, *_run_args(run, tiny_pairs_dir, tiny_pipeline_dir), "--resume") in (0, None)
    for sub in ("unet", "vae"):
        assert (run / "final" / sub / WEIGHTS).read_bytes() == (vae_run / "final" / sub / WEIGHTS).read_bytes(), sub
    for name in ("pytorch_lora_weights.safetensors", "vae_encoder/adapter_model.safetensors"):
        ours, straight = load_file(run / "final/lora" / name), load_file(vae_run / "final/lora" / name)
        assert ours.keys() == straight.keys() and all(torch.equal(ours[k], straight[k]) for k in ours), name


def test_a_pattern_that_fits_no_layer_is_refused_before_the_run_dir(tmp_path, monkeypatch, capsys, tiny_pipeline_dir, tiny_pairs_dir):
    run = tmp_path / "bad"
    code = _train(monkeypatch, *_run_args(run, tiny_pairs_dir, tiny_pipeline_dir,
                                          "train.lora.parts.vae_tail.targets=[encoder.down_blocks.3.*]"))
    assert code == 2
    assert "train.lora.parts.vae_tail.targets: 'encoder.down_blocks.3.*' matches no VAE encoder" in capsys.readouterr().err
    assert not run.exists()
