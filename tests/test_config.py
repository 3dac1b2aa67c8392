"""Configuration: presets, overrides, typed checking and nearest-key errors."""

from __future__ import annotations

import re

import pytest
import yaml

from dist_video.config import (Config, ConfigError, config_from_dict, config_to_dict, list_presets, load_config,
                               save_config)

PUBLISHED = {f"{d}-vit-b16-{s}" for d in ("k400", "ssv2") for s in ("8+16f", "16+32f", "32+64f")} | \
    {"k400-vit-l14-32+64f", "ssv2-vit-l14-32+64f"}


def test_every_published_setting_has_a_preset_with_the_paper_recipe():
    assert PUBLISHED <= set(list_presets())
    for name in PUBLISHED:
        cfg = load_config(name)
        sparse = int(name.split("-")[-1].split("+")[0])
        assert cfg.model.dist.num_frames == 2 * sparse and cfg.model.dist.alpha == 2
        assert cfg.model.dist.pooling_layers == (4 if name.startswith("k400") else 2)
        assert cfg.data.format == ("kinetics" if name.startswith("k400") else "ssv2")
        assert (cfg.optim.lr, cfg.optim.branch_lr_mult, cfg.optim.weight_decay) == (3.2e-5, 10.0, 1e-4)
        assert (cfg.optim.epochs, cfg.optim.warmup_epochs) == (36, 6)
        assert cfg.train.global_batch_size == 256
        assert (cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha, cfg.augment.label_smoothing) == (0.8, 1.0, 0.1)
        assert (cfg.data.num_views, cfg.data.num_crops, cfg.data.crop_size) == (3, 1, 224)


def test_overrides_are_typed():
    cfg = load_config("k400-vit-b16-8+16f", overrides=["optim.lr=1e-4", "train.batch_size=8",
                                                         "data.num_views=1", "model.head=linear",
                                                         "model.dist.selected_layers=[3, 7, 11]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 8 and cfg.data.num_views == 1 and cfg.model.head == "linear"
    assert cfg.model.dist.selected_layers == [3, 7, 11]


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("train.batchsize=2", "did you mean 'train.batch_size'?"),
    ("lr=3", "did you mean 'optim.lr'?"),
    ("model.dist.temporal_dimm=3", "did you mean 'model.dist.temporal_dim'?"),
    ("train.batch_size=many", "train.batch_size must be an integer, got 'many'"),
    ("data.flip=yes", "did you mean 'augment.flip'?"),
    ("model.dist.alpha=3", "num_frames (16) must be a multiple of alpha (3)"),
    ("optim.lr", "must look like key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("k400-vit-b16-8+16f", overrides=[override])
    assert message in str(info.value)


def test_config_file_with_base_and_unknown_key(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("base: ssv2-vit-b16-8+16f\noptim:\n  epochs: 3\ndata:\n  root: /videos\n")
    cfg = load_config(config_file=str(good))
    assert cfg.optim.epochs == 3 and cfg.data.root == "/videos" and cfg.model.dist.pooling_layers == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError,
                       match=r"bad.yaml: unknown key 'optim.weight_decy'; did you mean 'optim.weight_decay'"):
        load_config(config_file=str(bad))
    with pytest.raises(ConfigError,
                       match=re.escape("unknown preset 'k400-vit-b16-8+16'; did you mean 'k400-vit-b16-8+16f'")):
        load_config("k400-vit-b16-8+16")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(config_file=str(tmp_path / "missing.yaml"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("k400-vit-b16-16+32f", overrides=["data.root=/x"])
    save_config(cfg, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again, Config)
