"""Checkpoints by `s3://` URL, against moto's S3-compatible server on 127.0.0.1, through s3fs as a user would:
the endpoint and credentials come from the standard AWS environment variables."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import ckptview  # noqa: E402
from conftest import SmallCNN  # noqa: E402

BUCKET = "runs"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in (("AWS_ENDPOINT_URL", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before these variables would keep its endpoint
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # moto keeps its buckets per process, not per server: the next test starts empty only after a reset
        urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
        server.stop()


def test_s3_listing_and_statistics_equal_local(s3: object, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = SmallCNN().state_dict()
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "cnn.pt")
    save_file(state, str(tmp_path / "cnn.safetensors"))
    for name in ("cnn.pt", "cnn.safetensors"):
        s3.put(str(tmp_path / name), f"{BUCKET}/models/{name}")  # type: ignore[attr-defined]
        with ckptview.open(f"s3://{BUCKET}/models/{name}") as remote, ckptview.open(tmp_path / name) as local:
            assert remote.format == local.format
            assert [(e.name, e.shape, e.dtype) for e in remote.tensors()] == \
                [(e.name, e.shape, e.dtype) for e in local.tensors()]
            assert ckptview.stats(remote, progress=False).to_frame().equals(
                ckptview.stats(local, progress=False).to_frame())


def test_s3_run_folder_orders_by_epoch_and_matches_local(s3: object, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 10):
        torch.manual_seed(epoch)
        torch.save({"epoch": epoch, "model_state_dict": SmallCNN().state_dict()}, run / f"epoch_{epoch}.pt")
        s3.put(str(run / f"epoch_{epoch}.pt"), f"{BUCKET}/run/epoch_{epoch}.pt")  # type: ignore[attr-defined]
    remote = ckptview.open_run(f"s3://{BUCKET}/run", cache=False)
    assert [c.epoch for c in remote.checkpoints] == [1, 2, 10]
    assert remote.checkpoints[0].path == f"s3://{BUCKET}/run/epoch_1.pt"
    local = ckptview.open_run(run, cache=False)
    columns = ["module", "epoch", "weight_norm", "rel_change_prev"]  # NaN at the first checkpoint: equal frames
    assert remote.analyze(progress=False).drift_frame()[columns].equals(local.analyze(progress=False).drift_frame()[columns])
