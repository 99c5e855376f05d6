"""Config = defaults ← YAML ← key=value; bad keys and values fail naming the dotted key."""

import pytest
import yaml

from pipelines.config import Config, ConfigError, from_dict, load_config, save_config
from vqcore.models import ImageTokenizerConfig, model_config
from vqcore.models.discriminator import Discriminator3DConfig, PatchDiscriminator2DConfig


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.001}, "train": {"steps": 7}}))
    cfg = load_config(path, ["optim.lr=3e-4", "model.quantizer.type=vq", "optim.betas=[0.5, 0.9]"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # the override wins over the file
    assert cfg.train.steps == 7  # the file wins over the default
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.model.quantizer["type"] == "vq"
    assert cfg.optim.eps == 1e-8  # default kept


def test_model_and_disc_are_typed_by_vqcore(tmp_path):
    """`model` and `disc` are vqcore's typed configs; the discriminator's type defaults to the
    model's kind (3D for a video tokenizer, PatchGAN for an image one)."""
    cfg = load_config(None, ["model.latent_dim=8", "disc.flavour=debug"])
    assert cfg.model == model_config({"type": "pvqvae", "flavour": "debug", "latent_dim": 8})
    assert cfg.disc == Discriminator3DConfig.debug()
    image = load_config(None, ["model={type: image_tokenizer, flavour: vqvae_debug}"])
    assert isinstance(image.model, ImageTokenizerConfig) and not image.model.takes_clips
    assert image.disc == PatchDiscriminator2DConfig()
    # every field written out, read back to the same typed config (what a worker receives)
    plain = cfg.to_dict()
    assert plain["model"]["type"] == "pvqvae" and plain["model"]["latent_dim"] == 8
    assert plain["disc"]["type"] == "disc3d" and plain["disc"]["channels"] == [8, 16, 32]
    again = from_dict(Config, plain, "")
    assert again.model == cfg.model and again.disc == cfg.disc


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
        ("model.latent_dimm=4", "latent_dimm"),
        ("model.flavour=huge", "huge"),
        ("model.quantizer.codebook_sizee=4", "codebook_sizee"),
        ("disc.channelz=4", "channelz"),
        ("disc.kernel_size=2", "kernel_size"),
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
