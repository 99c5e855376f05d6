"""Config = defaults ← YAML ← key=value; bad keys and values fail naming the dotted key."""

import pytest
import yaml

from pipelines.config import ConfigError, load_config, save_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.001}, "train": {"steps": 7}}))
    cfg = load_config(path, ["optim.lr=3e-4", "model.quantizer.type=vq", "optim.betas=[0.5, 0.9]"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # the override wins over the file
    assert cfg.train.steps == 7  # the file wins over the default
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.model["quantizer"]["type"] == "vq"
    assert cfg.optim.eps == 1e-8  # default kept


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=3", "data.batch_size=2"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()
    assert again.train.steps == 3 and again.data.batch_size == 2


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("train.zero_stage=5", "train.zero_stage"),
        ("train.steps=ten", "train.steps"),
        ("data.batch_size=0", "batch_size"),
        ("loss.recon=l3", "loss.recon"),
        ("run.resume=maybe", "run.resume"),
        ("optim.betas=[0.9]", "optim.betas"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_compile_with_zero3_is_refused():
    with pytest.raises(ConfigError, match=r"train\.compile.*zero_stage 3"):
        load_config(None, ["train.compile=true", "train.zero_stage=3"])
    assert load_config(None, ["train.compile=true", "train.zero_stage=2"]).train.compile


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["lr"])
