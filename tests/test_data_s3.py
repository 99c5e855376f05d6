"""Shards in a bucket, read as a cluster reads them: `s3://` URIs against a real S3
endpoint (moto's server on loopback, the endpoint given as AWS_ENDPOINT_URL as for any
S3-compatible store). Globbing, the shard check (a shard cut short in the bucket too), the
plain iterator and Ray Data all go through pyarrow.fs (issue 27)."""

from __future__ import annotations

import socket
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from pipelines.data.batches import DataConfig
from pipelines.data.ray_dataset import build_dataset
from pipelines.data.stream import BatchStream, iter_batches
from pipelines.data.tars import check_shards, list_shards

BUCKET = "vqtok-shards"


@pytest.fixture(scope="module")
def s3(shards, tmp_path_factory):
    """A loopback S3 endpoint holding the demo shards under s3://BUCKET/demo/, plus one
    shard cut short; yields the URIs' prefix and the number of samples in the train shards."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        bucket = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                 allow_bucket_creation=True)  # fmt: skip
        bucket.create_dir(BUCKET)
        for f in shards["files"]:
            with bucket.open_output_stream(f"{BUCKET}/demo/{Path(f).name}") as out:
                out.write(Path(f).read_bytes())
        first = min(f for f in shards["files"] if Path(f).name.startswith("train"))
        with tarfile.open(first) as tf:  # cut inside the header of a member half way
            cut = tf.getmembers()[len(tf.getmembers()) // 2].offset + 100
        with bucket.open_output_stream(f"{BUCKET}/cut/train-cut.tar") as out:
            out.write(Path(first).read_bytes()[:cut])
        yield f"s3://{BUCKET}"
    server.stop()


def _cfg(shards: list[str]) -> DataConfig:
    return DataConfig(shards=tuple(shards), resolutions=((32, 32),), frame_counts=(4,),
                      batch_size=2, min_frames=1)  # fmt: skip


def test_globs_and_the_shard_check_read_the_bucket(s3, shards):
    local = sorted(Path(f).name for f in shards["files"] if Path(f).name.startswith("train"))
    found = list_shards([f"{s3}/demo/train-*.tar"])
    assert [u.rsplit("/", 1)[1] for u in found] == local and all(u.startswith(s3) for u in found)
    assert list_shards([f"{s3}/demo"]) == sorted(list_shards([f"{s3}/demo/*.tar"]))
    check = check_shards([*found, f"{s3}/cut/train-cut.tar"])
    assert not check.bad and list(check.cut) == [f"{s3}/cut/train-cut.tar"]
    local_check = check_shards(sorted(f for f in shards["files"] if "train" in Path(f).name))
    assert [check.samples[u] for u in found] == list(local_check.samples.values())


def test_vqtok_shards_writes_to_the_bucket(s3, tmp_path):
    """`vqtok shards --out s3://…`: shards uploaded as they complete, manifest beside them,
    nothing left on local disk; they read back through the training decode path."""
    from skimage import data as photos

    from pipelines.cli import main
    from pipelines.tracking.media import save_png

    inputs = tmp_path / "inputs"
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "camera")):
        save_png(getattr(photos, name)()[:96, :96], inputs / f"img{i}.png")
    assert main(["shards", str(inputs), "--out", f"{s3}/written", "--max-count", "2",
                 "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    written = list_shards([f"{s3}/written/shard-*.tar"])
    assert len(written) == 3 and list_shards([f"{s3}/written/shard.manifest.json"])
    stream = iter_batches(_cfg(written))
    assert sum(len(b["keys"]) for b in stream) == 5 and not stream.skipped


def test_plain_iterator_and_ray_data_read_s3_like_local(s3, shards, ray_local):
    """The same batches from the bucket as from the local files, on both read paths."""
    local = iter_batches(_cfg(shards["train"]))
    keys = [k for b in local for k in b["keys"]]
    remote = iter_batches(_cfg([f"{s3}/demo/train-*.tar"]))
    assert [k for b in remote for k in b["keys"]] == keys and remote.samples == len(keys) > 0
    ray_stream = BatchStream(build_dataset(_cfg([f"{s3}/demo/train-*.tar",
                                                 f"{s3}/cut/train-cut.tar"])))  # fmt: skip
    got = Counter(k for b in ray_stream for k in b["keys"])
    assert set(keys) <= set(got) and ray_stream.skipped.get("cut_shard") == 1


@pytest.mark.slow
def test_training_runs_from_shards_in_the_bucket(s3, tmp_path, ray_local):
    """The cluster command of cluster/README.md with the bucket's URIs: Ray Train workers
    read the shards from S3 (train and eval)."""
    from pipelines.config import load_config
    from pipelines.training.launch import fit

    cfg = load_config("jobs/debug.yaml", [f"data.shards=[{s3}/demo/train-*.tar]",
                                          f"train.eval_shards=[{s3}/demo/val-*.tar]",
                                          f"run.storage={tmp_path}", "run.name=s3",
                                          "train.steps=2", "loss.gan_weight=0"])  # fmt: skip
    metrics = fit(cfg)
    assert metrics["step"] == 2 and metrics["data/samples"] > 0 and metrics["eval/samples"] > 0
    assert 0 <= metrics["train/data_wait_frac"] <= 1  # the share of the step spent in next()


def test_tokenize_writes_to_the_bucket_and_resumes_there(s3, shards, tmp_path):
    """`vqtok tokenize --out s3://…`: token shards and their stats uploaded as they complete,
    the manifest beside them, nothing left on local disk; a second run finds them done and
    writes nothing; another model is refused there as in a folder."""
    import json

    import torch

    from pipelines.cli import main
    from pipelines.data.shards import download
    from pipelines.inference.tokenize import iter_token_samples, token_shard_name
    from pipelines.store.models import export_model
    from vqcore.models import build_model

    torch.manual_seed(0)
    cfg = {"type": "pvqvae", "flavour": "debug"}
    model = export_model(build_model(cfg), cfg, tmp_path / "model")
    src = list_shards([f"{s3}/demo/train-*.tar"])
    out = f"{s3}/tokens"
    args = ["tokenize", "--model", str(model), "--data", *src, "--out", out, "--actors", "0",
            "data.resolutions=[[32,32]]", "data.frame_counts=[4]"]  # fmt: skip
    assert main(args) == 0
    assert not list(Path(tempfile.gettempdir()).glob("vqtok-tokens-*"))  # staging removed
    names = sorted(u.rsplit("/", 1)[1] for u in list_shards([f"{out}/*.tar"]))
    assert names == sorted(token_shard_name(s) for s in src)
    manifest = json.loads(download(f"{out}/manifest.json", tmp_path / "m.json").read_text())
    assert manifest["totals"]["shards"] == len(src) and manifest["this_run"]["shards_written"]
    tar = download(f"{out}/{names[0]}", tmp_path / names[0])
    assert sum(1 for _ in iter_token_samples(tar)) == manifest["shards"][0]["samples"] > 0
    assert main(args) == 0  # resumed: every shard is there already
    again = json.loads(download(f"{out}/manifest.json", tmp_path / "m2.json").read_text())
    assert again["this_run"]["shards_written"] == 0 and again["totals"] == manifest["totals"]
    torch.manual_seed(1)
    other = export_model(build_model(cfg), cfg, tmp_path / "other")
    assert main([*args[:2], str(other), *args[3:]]) == 2  # another model: a one-line error
