"""The Ray Train job on a real Ray: a folder + JSONL dataset, checkpoints, resumption.

The first test runs `imagine train` as the README does, on a local Ray of its own. The others join
one running cluster (``ray start --head``, token authentication) through ``RAY_ADDRESS``, as the
RayJob's trainer does on Kubernetes (deploy/k8s/base/train/ray-job.yaml); sharing it also spares
each run a Ray start-up and shutdown (~10 s of a ~45 s run on 2 cores).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagine.models.dual_encoder import load_dual_encoder
from imagine.runtime import LOOPBACK_RAY_ENV
from tests.conftest import free_port, wait_for_line

pytestmark = pytest.mark.integration
LOCAL_RAY_SESSIONS = Path(tempfile.gettempdir()) / "ray"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, str]]:
    """A Ray head on loopback with token authentication; yields the environment that joins it.

    Its temp dir is its own (short: Ray's socket paths are limited), so the address file that
    `ray start` writes there does not send other tests' ``ray.init()`` to this cluster, and the
    token is not written to ``~/.ray``.
    """
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port, log = free_port(), temp / "head.log"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--port", str(port), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
        "--disable-usage-stats", "--temp-dir", str(temp),
    ]  # fmt: skip
    env = {**os.environ, **auth, **LOOPBACK_RAY_ENV}  # its nodes and workers on 127.0.0.1
    with log.open("wb") as out:
        head = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_line(log, "Ray runtime started", head, timeout=120)
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process of the cluster
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _folder_dataset(root: Path, n: int = 96) -> Path:
    """Two kinds of synthetic product shots: bright squares and dark stripes, with captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        kind = i % 2
        img = np.zeros((28, 28), dtype=np.uint8)
        if kind == 0:
            img[6:22, 6:22] = 200 + rng.integers(0, 55)
        else:
            img[:, ::4] = 60 + rng.integers(0, 40)
        name = f"img{i:03d}.png"
        Image.fromarray(img, mode="L").save(root / name)
        caption = "a bright square box" if kind == 0 else "a dark striped scarf"
        lines.append(json.dumps({"image": name, "caption": caption, "label": str(kind)}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _train(
    args: list[str],
    data_dir: Path,
    entry: tuple[str, ...] = ("trainer",),
    ray_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The trainer in a process of its own; on a local Ray unless ``ray_env`` joins a cluster."""
    env = {
        **os.environ,
        "IMAGINE_DATA_DIR": str(data_dir),
        "IMAGINE_PLAIN_PROGRESS": "1",
        **(ray_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", *entry, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _assert_matches_each_kind_to_its_caption(checkpoint: Path) -> None:
    encoder = load_dual_encoder(f"local-dir:{checkpoint}", device="cpu")
    bright = Image.fromarray(np.pad(np.full((16, 16), 230, np.uint8), 6), mode="L")
    stripes = np.zeros((28, 28), np.uint8)
    stripes[:, ::4] = 80
    img = encoder.encode_images([bright, Image.fromarray(stripes, mode="L")])
    txt = encoder.encode_text(["a bright square box", "a dark striped scarf"])
    sims = img @ txt.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0], sims


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A Ray temp dir (RAY_TMPDIR) of the test's own, short: Ray's socket paths are limited."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def test_the_aggregator_stage_trains_an_attention_aggregator_with_its_weight_decay(
    tmp_path: Path, ray_tmp: Path
) -> None:
    """``imagine train --stage aggregator`` as the README writes it, on tiny models; the
    configured weight decay reaches the attention weights (it used to be dropped). It starts a
    Ray of its own even where the last `ray start`'s address file names a cluster that is gone
    (Ray's default joined that, and failed)."""
    from imagine.models.aggregator import load_aggregator

    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    data = _folder_dataset(tmp_path / "ds", n=32)
    norms = {}
    for decay in ("0", "30"):
        out = tmp_path / f"agg-{decay}"
        res = _train(
            [
                "--stage", "aggregator", "--dataset", f"folder:{data}", "--output", str(out),
                "--epochs", "5", "--weight-decay", decay, "--set", "mode=attention",
                "--set", "dual_model=config:tiny-dual", "--set", "vision_model=config:tiny-vision",
                "--set", "generator_model=config:tiny-generator", "--set", "steps=2",
                "--set", "num_generated=2", "--set", "gallery=16",
            ],
            tmp_path,
            entry=("imagine.cli", "train"),
            ray_env={"RAY_TMPDIR": str(ray_tmp)},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert list((ray_tmp / "ray").glob("session_2*")), "no local Ray was started"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["weight_decay"] == float(decay)
        assert manifest["training"]["fit_metrics"]["mode"] == "attention"
        agg = load_aggregator(f"local-dir:{out}")
        assert agg.mode == "attention"
        attention = agg.module.attention
        assert attention is not None
        norms[decay] = sum(float((p.detach() ** 2).sum()) for p in attention.parameters())
    assert norms["30"] < 0.8 * norms["0"], norms


def test_trains_on_a_folder_dataset_and_resumes(
    tmp_path: Path, ray_cluster: dict[str, str]
) -> None:
    data = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "ckpt"
    common = [
        "--dataset", f"folder:{data}", "--model-config", "tiny-dual", "--output", str(out),
        "--batch-size", "16", "--checkpoint-every", "2", "--lr", "3e-3",
    ]  # fmt: skip
    sessions = set(LOCAL_RAY_SESSIONS.glob("session_2*"))
    first = _train([*common, "--epochs", "1"], tmp_path, ray_env=ray_cluster)
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(LOCAL_RAY_SESSIONS.glob("session_2*")) == sessions  # it joined: no Ray of its own
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 6  # 96 examples / 16 per batch
    assert manifest["dataset"] == f"folder:{data}"
    assert len(manifest["data_fingerprint"]) == 16
    assert manifest["model_version"].startswith("ckpt-")

    # the resumed run names the cluster with --address instead of RAY_ADDRESS
    auth = {k: v for k, v in ray_cluster.items() if k != "RAY_ADDRESS"}
    address = ["--address", ray_cluster["RAY_ADDRESS"]]
    second = _train([*common, "--epochs", "3", *address], tmp_path, ray_env=auth)
    assert second.returncode == 0, second.stderr[-3000:]
    assert set(LOCAL_RAY_SESSIONS.glob("session_2*")) == sessions
    assert "resumed from" in second.stdout + second.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 18

    _assert_matches_each_kind_to_its_caption(out)


def test_two_workers_train_one_dual_encoder_with_ddp(
    tmp_path: Path, ray_cluster: dict[str, str]
) -> None:
    data = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "ckpt"
    res = _train(
        [
            "--dataset", f"folder:{data}", "--model-config", "tiny-dual", "--output", str(out),
            "--batch-size", "8", "--epochs", "4", "--lr", "3e-3", "--num-workers", "2",
        ],
        tmp_path,
        ray_env=ray_cluster,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 24  # 96 examples / (8 per batch x 2 workers) x 4

    _assert_matches_each_kind_to_its_caption(out)


@pytest.mark.parametrize(
    ("stage", "config"), [("vision", "tiny-vision"), ("generator", "tiny-generator")]
)
def test_two_workers_train_the_vision_and_generator_stages(
    tmp_path: Path, ray_cluster: dict[str, str], stage: str, config: str
) -> None:
    data = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "ckpt"
    res = _train(
        [
            "--stage", stage, "--dataset", f"folder:{data}", "--model-config", config,
            "--output", str(out), "--batch-size", "8", "--epochs", "1", "--num-workers", "2",
            "--eval-limit", "32",
        ],
        tmp_path,
        ray_env=ray_cluster,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]  # (the generator's used to hang here)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 6  # 96 examples / (8 per batch x 2 workers)


def test_distill_stage_gives_a_one_pass_generator_from_a_teacher(
    tmp_path: Path, ray_cluster: dict[str, str]
) -> None:
    """``--stage distill`` on a saved (tiny, random) teacher: the checkpoint is a generator whose
    UNet takes the guidance scale as an input, and it serves queries."""
    from imagine.models.generator import Generator, load_generator

    teacher = tmp_path / "teacher"
    load_generator("config:tiny-generator", device="cpu").save(teacher, {"steps": 0})
    data = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "distilled"
    res = _train(
        [
            "--stage", "distill", "--dataset", f"folder:{data}", "--output", str(out),
            "--set", f"teacher_model=local-dir:{teacher}", "--set", "guidance_width=8",
            "--batch-size", "8", "--epochs", "1", "--eval-limit", "32",
        ],
        tmp_path,
        ray_env=ray_cluster,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 12  # 96 examples / 8 per batch
    assert manifest["config"]["teacher_model"] == f"local-dir:{teacher}"
    student = load_generator(f"local-dir:{out}", device="cpu")
    assert isinstance(student, Generator)
    assert student.pipeline.unet.config.time_cond_proj_dim == 8
    images = student.generate(["a dark coat"], num_images=2, steps=3, guidance=2.0, seed=1)
    again = student.generate(["a dark coat"], num_images=2, steps=3, guidance=2.0, seed=1)
    assert [np.asarray(i).tolist() for i in images[0]] == [np.asarray(i).tolist() for i in again[0]]


def test_a_single_worker_stage_refuses_more_workers(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path / "ds", n=8)
    res = _train(
        ["--stage", "captioner", "--dataset", f"folder:{data}", "--num-workers", "2"], tmp_path
    )
    assert res.returncode == 2
    assert "stage captioner trains on one worker, not 2" in res.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing started


def test_bad_dataset_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.jsonl").write_text('{"image": "missing.png", "caption": "x"}\n')
    res = _train(
        ["--dataset", f"folder:{tmp_path / 'ds'}", "--model-config", "tiny-dual"], tmp_path
    )
    assert res.returncode != 0
    assert "missing.png not found" in res.stdout + res.stderr


def test_caption_stage_learns_the_captions_of_a_folder_dataset(
    tmp_path: Path, ray_cluster: dict[str, str]
) -> None:
    """Cross-entropy then self-critical steps on a folder dataset (captions used as given); the
    checkpoint keeps its vocabulary and captions held-out images of each kind correctly."""
    from imagine.models.captioner import load_captioner

    data = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "cap"
    result = _train(
        [
            "--stage", "captioner", "--dataset", f"folder:{data}", "--model-config",
            "tiny-captioner", "--output", str(out), "--batch-size", "16", "--epochs", "15",
            "--lr", "3e-3", "--set", "dual_model=config:tiny-dual", "--set", "scst_steps=3",
            "--set", "scst_batch_size=8",
        ],
        tmp_path,
        ray_env=ray_cluster,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["xe_steps"] == 90 and manifest["training"]["scst_steps"] == 3
    assert manifest["training"]["steps"] == 93
    assert manifest["stage"] == "captioner" and manifest["model_version"].startswith("cap-")

    captioner = load_captioner(f"local-dir:{out}", device="cpu")
    assert captioner.vocab[4:] == sorted(
        ["a", "bright", "square", "box", "dark", "striped", "scarf"]
    )
    bright = Image.fromarray(np.pad(np.full((16, 16), 230, np.uint8), 6), mode="L")
    stripes = np.zeros((28, 28), np.uint8)
    stripes[:, ::4] = 80
    caps = captioner.caption([bright, Image.fromarray(stripes, mode="L")], "beam", beam_size=2)
    assert [c.text for c in caps] == ["a bright square box", "a dark striped scarf"], caps
