"""The typed config tree: recipes, overrides, errors that name the key, --dry-run."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bld_t2i.config import Config, ConfigError, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no YAML"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    # the resolved tree round-trips through a plain dict (what checkpoints store)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_overrides_and_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"total_samples": 100}, "optim": {"lr": 1}}))
    cfg = load_config(recipe, ["train.zero_stage=3", "optim.betas=[0.9,0.95]", "run.name=abc", "optim.lr=2e-4"])
    assert cfg.train.total_samples == 100 and cfg.train.zero_stage == 3
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.name == "abc"


def test_unknown_key_names_key_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.zero_stag.*zero_stage"):
        load_config(None, ["train.zero_stag=2"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml.*optim\.lrr.*'lr'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.total_samples=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'train\.total_samples'.*integer"):
        load_config(None, ["train.total_samples=many"])
    with pytest.raises(ConfigError, match=r"'optim\.lr'.*number"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'log\.wandb'.*true/false"):
        load_config(None, ["log.wandb=3"])
    with pytest.raises(ConfigError, match=r"'optim'.*section"):
        load_config(None, ["optim=3"])


def test_dry_run_prints_resolved_config():
    recipe = next(p for p in RECIPES if "ae" not in p.parts)
    out = subprocess.run(
        [sys.executable, "-m", "bld_t2i.cli.train", "--recipe", str(recipe), "--dry-run", "train.zero_stage=3"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert yaml.safe_load(out)["train"]["zero_stage"] == 3


def test_cli_config_error_is_clean():
    recipe = next(p for p in RECIPES if "ae" not in p.parts)
    proc = subprocess.run(
        [sys.executable, "-m", "bld_t2i.cli.train", "--recipe", str(recipe), "train.zero_stag=3"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode != 0 and "zero_stage" in proc.stderr and "Traceback" not in proc.stderr


ENTRY_POINTS = {  # command, flags given, the section printed and one value the flags set in it
    "make_shards": (["data_tools/make_shards.py", "--source", "fashion-mnist", "--out", "o", "--size", "32"],
                    "shards", "size", 32),
    "encode_latents": (["data_tools/encode_latents.py", "--shards", "s.tar", "--autoencoder", "ae", "--out", "o",
                        "--batch-size", "7"], "encode", "batch_size", 7),
    "train_ae": (["-m", "bld_t2i.cli.train_ae", "--recipe", "recipes/ae/emoji64.yaml", "train.total_samples=9"],
                 "train", "total_samples", 9),
    "train": (["-m", "bld_t2i.cli.train", "--recipe", "recipes/t2i_emoji_demo.yaml", "denoiser.preset=tiny"],
              "denoiser", "preset", "tiny"),
    "sample": (["-m", "bld_t2i.cli.sample", "--model", "m", "--out", "o", "--prompt", "red apple",
                "--guidance-interval", "0.2", "0.8"], "sample", "guidance_interval", [0.2, 0.8]),
    "evaluate": (["-m", "bld_t2i.cli.evaluate", "--model", "m", "--prompts", "p.txt", "--out", "o", "--guidance", "0,3",
                  "--guidance-interval", "0:1,0.2:0.8"], "evaluate", "guidance_interval", [[0.0, 1.0], [0.2, 0.8]]),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_answers_dry_run_with_its_resolved_config(name, tmp_path):
    args, section, key, value = ENTRY_POINTS[name]
    proc = subprocess.run([sys.executable, *args, "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed[section][key] == value
    assert not (ROOT / "o").exists()  # a dry run writes nothing
    if name == "train_ae":  # an entry point prints (and saves) the sections it uses, not the others'
        assert "denoiser" not in printed and "ae_loss" in printed


def test_an_entry_point_names_the_missing_field_and_its_flag():
    proc = subprocess.run([sys.executable, "-m", "bld_t2i.cli.sample", "--out", "o"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode != 0 and "sample.model is empty; give it with --model" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bld_t2i.cli.sample", "--model", "m", "--out", "o", "--dtype", "bf61"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "bf16" in proc.stderr and "Traceback" not in proc.stderr
