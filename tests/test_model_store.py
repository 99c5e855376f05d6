"""The exported model: code flattening, loading errors, image models through tokenize."""

from __future__ import annotations

import pytest
import torch

from pipelines.store.models import (
    ModelLoadError,
    export_model,
    flatten_codes,
    load_model,
    unflatten_codes,
)
from vqcore.models import build_model


@pytest.mark.parametrize(
    "codes",
    [
        torch.arange(6).view(2, 3),
        (torch.zeros(2, 1), torch.ones(2, 2), torch.full((2, 3), 2)),
        ((torch.zeros(2, 1), torch.ones(2, 2)), torch.full((2, 3), 2)),  # HFSVQ: (rvq, pq)
        (torch.zeros(2, 1), (torch.ones(2, 2), (torch.full((2, 3), 2), torch.ones(1)))),
    ],
)
def test_flatten_codes_round_trip(codes):
    flat = flatten_codes(codes)
    back = unflatten_codes(flat)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        return isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))

    assert same(codes, back), (flat.keys(), back)


def test_corrupt_or_mismatched_weights_name_the_file(tmp_path):
    cfg = {"type": "image_tokenizer", "flavour": "vqvae_debug"}
    out = export_model(build_model(cfg), cfg, tmp_path / "model")
    weights = out / "artifacts" / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupted or unreadable weights .*model.pt"):
        load_model(out)
    other = {"type": "image_tokenizer", "flavour": "looc_vae_debug"}
    torch.save(build_model(other).state_dict(), weights)
    with pytest.raises(ModelLoadError, match="does not fit the model"):
        load_model(out)


def test_image_model_tokens_per_frame_round_trip(tmp_path):
    """An image model (HFSVQ: nested codes of F_L and F_H) codes each real frame; the
    in-process tokenize -> detokenize equals its own reconstruction of each image."""
    from pipelines.data.demo_data import make_demo_data
    from pipelines.inference.tokenize import detokenize_sample, iter_token_samples, tokenize

    make_demo_data(tmp_path / "d", crops_per_photo=1, clips_per_photo=1, max_count=4)
    shards = sorted(str(p) for p in (tmp_path / "d").glob("val-*.tar"))
    torch.manual_seed(0)
    cfg = {"type": "hfsvq", "flavour": "debug"}
    loaded = load_model(export_model(build_model(cfg), cfg, tmp_path / "model"))
    data = ["data.resolutions=[[32,32]]", "data.frame_counts=[2]", "data.batch_size=2"]
    manifest = tokenize(loaded, shards, tmp_path / "tok", data, actors=0)
    assert manifest["totals"]["samples"] > 0
    for tar in (tmp_path / "tok").glob("*.tar"):
        for info, codes in iter_token_samples(tar):
            frames = info["num_frames"]
            assert all(c.shape[0] == frames for c in codes.values())
            x = detokenize_sample(loaded, info, codes)
            assert x.shape == (3, frames, 32, 32) and torch.isfinite(x).all()
