"""The vision-only encoder (open_clip and timm backbones) and the CLE-TIR aggregator + fusion.

Tiny models only: the tiny-vision config, a 2-block timm ViT at 32x32, 32-d synthetic embeddings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.models.aggregator import (
    Aggregator,
    AttentionAggregator,
    CLSAttentionLayer,
    FusionWeight,
    load_aggregator,
    mean_aggregate,
    new_aggregator,
    retrieval_map,
    train_aggregator,
)
from imagine.models.registry import MANIFEST_FILE, WEIGHTS_FILE, ModelLoadError, add_model_config
from imagine.models.vision import VisionEncoder, load_vision_encoder
from trainer.vision_stage import augment, choose_objective, contrastive_loss

ROOT = Path(__file__).resolve().parents[2]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), mode="L"),
        Image.new("RGB", (40, 30), (200, 10, 10)),  # other size and mode: resized, converted
        Image.new("L", (28, 28), 0),
    ]


def _assert_unit_float32(vecs: np.ndarray, shape: tuple[int, int]) -> None:
    assert vecs.dtype == np.float32
    assert vecs.shape == shape
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


# -- vision encoder: open_clip backbone ----------------------------------------------------------
@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return load_vision_encoder("config:tiny-vision", device="cpu")


@pytest.fixture(scope="module")
def checkpoint(encoder: VisionEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vision") / "tiny-vision-run"
    encoder.save(path, {"dataset": "fashion-mnist", "epochs": 0})
    return path


def test_encode_images_gives_normalised_deterministic_vectors(encoder: VisionEncoder) -> None:
    vecs = encoder.encode_images(_images())

    _assert_unit_float32(vecs, (3, 16))
    assert encoder.dim == 16
    assert encoder.model_version == "tiny-vision-random0"
    np.testing.assert_array_equal(vecs, encoder.encode_images(_images()))
    # Batching does not change a vector.
    np.testing.assert_allclose(encoder.encode_images(_images()[2:])[0], vecs[2], atol=1e-5)
    np.testing.assert_allclose(encoder.encode_images(_images(), batch_size=1), vecs, atol=1e-5)
    assert not np.allclose(vecs[0], vecs[2])
    assert encoder.encode_images([]).shape == (0, 16)


def test_same_config_and_seed_give_the_same_model(encoder: VisionEncoder) -> None:
    again = load_vision_encoder("config:tiny-vision", device="cpu")
    other = load_vision_encoder("config:tiny-vision", device="cpu", seed=1)

    np.testing.assert_array_equal(again.encode_images(_images()), encoder.encode_images(_images()))
    assert not np.allclose(other.encode_images(_images()), encoder.encode_images(_images()))


def test_round_trip_keeps_vectors_and_names_the_version(
    encoder: VisionEncoder, checkpoint: Path
) -> None:
    loaded = load_vision_encoder(f"local-dir:{checkpoint}", device="cpu")
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())

    np.testing.assert_array_equal(loaded.encode_images(_images()), encoder.encode_images(_images()))
    assert loaded.model_version == manifest["model_version"]
    assert loaded.model_version.startswith("tiny-vision-run-")
    assert manifest["dataset"] == "fashion-mnist"
    assert loaded.config["family"] == "vision"


def test_missing_checkpoint_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vision_encoder(f"local-dir:{tmp_path / 'nope'}")


def test_checkpoint_without_weights_raises(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"missing model\.safetensors"):
        load_vision_encoder(f"local-dir:{tmp_path}")


def test_corrupt_weights_raise(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    good = (checkpoint / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_vision_encoder(f"local-dir:{tmp_path}")


def test_corrupt_config_raises(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / WEIGHTS_FILE).write_bytes((checkpoint / WEIGHTS_FILE).read_bytes())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt JSON"):
        load_vision_encoder(f"local-dir:{tmp_path}")


def test_checkpoint_of_another_family_raises(tmp_path: Path, checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"family": "dual_encoder"}))
    (tmp_path / WEIGHTS_FILE).write_bytes((checkpoint / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="not a vision encoder"):
        load_vision_encoder(f"local-dir:{tmp_path}")


def test_weights_of_another_architecture_raise(tmp_path: Path, checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_cfg"]["width"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes((checkpoint / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_vision_encoder(f"local-dir:{tmp_path}")


@pytest.mark.parametrize(
    "spec", ["tiny-vision", "hub:x", "timm:", "timm:name@", "config:tiny-dual"]
)
def test_bad_specs_raise(spec: str) -> None:
    with pytest.raises(ModelLoadError):
        load_vision_encoder(spec)


# -- vision encoder: timm backbone (the pretrained profile, from local same-format files) -------
TIMM_NAME = "vit_tiny_patch16_224"
TIMM_ARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "depth": 2,
    "embed_dim": 48,
    "num_heads": 2,
}


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """Random weights saved the way timm publishes pretrained ones (config.json + safetensors)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(7)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **TIMM_ARGS).eval()
    root = tmp_path_factory.mktemp("timm") / "tiny-dino"
    save_for_hf(model, str(root), safe_serialization=True)
    return root, model


def test_timm_spec_loads_local_weights(timm_dir: tuple[Path, torch.nn.Module]) -> None:
    import timm

    root, reference = timm_dir
    enc = load_vision_encoder(f"timm:{TIMM_NAME}@{root}", device="cpu")
    vecs = enc.encode_images(_images())

    _assert_unit_float32(vecs, (3, 48))
    assert enc.image_size == 32
    assert enc.config["backbone"] == "timm"
    assert enc.model_version.startswith("tiny-dino-")
    with torch.no_grad():
        pixels = enc.image_tensor(_images())
        expected = torch.nn.functional.normalize(reference(pixels), dim=-1).numpy()
        fresh = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **TIMM_ARGS)
        unloaded = torch.nn.functional.normalize(fresh.eval()(pixels), dim=-1).numpy()
    np.testing.assert_allclose(vecs, expected, atol=1e-5)
    assert not np.allclose(vecs, unloaded, atol=1e-3)  # the weights came from the file
    # The architecture can also come from timm's config.json, or through a local-dir spec.
    np.testing.assert_array_equal(
        load_vision_encoder(f"timm:{root}").encode_images(_images()), vecs
    )
    np.testing.assert_array_equal(
        load_vision_encoder(f"local-dir:{root}").encode_images(_images()), vecs
    )


def test_timm_encoder_round_trips_through_our_checkpoint(
    timm_dir: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    root, _ = timm_dir
    enc = load_vision_encoder(f"timm:{TIMM_NAME}@{root}", device="cpu")
    version = enc.save(tmp_path / "dino-ckpt", {"source": str(root)})
    loaded = load_vision_encoder(f"local-dir:{tmp_path / 'dino-ckpt'}", device="cpu")

    assert loaded.model_version == version
    assert loaded.config["timm_args"]["depth"] == 2
    np.testing.assert_array_equal(loaded.encode_images(_images()), enc.encode_images(_images()))


def test_timm_dir_without_weights_or_with_foreign_weights_raises(
    timm_dir: tuple[Path, torch.nn.Module], checkpoint: Path, tmp_path: Path
) -> None:
    root, _ = timm_dir
    (tmp_path / "config.json").write_bytes((root / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_vision_encoder(f"timm:{TIMM_NAME}@{tmp_path}")
    (tmp_path / WEIGHTS_FILE).write_bytes((checkpoint / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="do not match"):
        load_vision_encoder(f"timm:{TIMM_NAME}@{tmp_path}")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vision_encoder(f"timm:{TIMM_NAME}@{tmp_path / 'missing'}")


# -- vision stage helpers ----------------------------------------------------------------------
def test_contrastive_loss_rewards_grouped_features() -> None:
    torch.manual_seed(0)
    groups = torch.arange(4).repeat_interleave(4)
    centres = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    grouped = torch.nn.functional.normalize(centres[groups] + 0.1 * torch.randn(16, 8), dim=-1)
    shuffled = grouped[torch.randperm(16)]

    good = contrastive_loss(grouped, groups, 0.1)
    bad = contrastive_loss(shuffled, groups, 0.1)
    assert good < bad - 1.0
    # SimCLR as a case: two identical views per image beat two unrelated ones.
    views = torch.cat([grouped, grouped])
    ids = torch.arange(16).repeat(2)
    assert contrastive_loss(views, ids, 0.1) < contrastive_loss(
        torch.cat([grouped, shuffled]), ids, 0.1
    )


def test_objective_follows_whether_groups_repeat() -> None:
    assert choose_objective([0, 1, 0]) == "supcon"
    assert choose_objective([0, 1, 2]) == "simclr"
    assert choose_objective([0, 1, 0], "simclr") == "simclr"
    with pytest.raises(ValueError):
        choose_objective([0], "byol")


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    x = torch.rand(8, 3, 28, 28)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))

    assert a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
    flipped = augment(x, torch.Generator().manual_seed(0), "flip")
    for row, out in zip(x, flipped, strict=True):  # each image is itself or its mirror image
        assert torch.equal(out, row) or torch.equal(out, row.flip(-1))
    assert not torch.equal(flipped, x)
    with pytest.raises(ValueError):
        augment(x, torch.Generator(), "rotate")


# -- aggregator ----------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every weight a random value so the aggregator is no longer the mean."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def test_untrained_attention_aggregator_is_the_normalised_mean() -> None:
    x = _unit(np.random.default_rng(0).normal(size=(5, 6, 32))).astype(np.float32)
    agg = new_aggregator("attention", dim=32)
    out = agg.aggregate(x)

    _assert_unit_float32(out, (5, 32))
    np.testing.assert_allclose(out, _unit(x.mean(axis=1)), atol=1e-5)
    np.testing.assert_allclose(
        mean_aggregate(torch.from_numpy(x)).numpy(), _unit(x.mean(axis=1)), atol=1e-6
    )


def test_attention_aggregator_is_permutation_invariant_and_normalised() -> None:
    torch.manual_seed(0)
    net = AttentionAggregator(dim=16, layers=2)
    _randomise(net)
    x = torch.nn.functional.normalize(torch.randn(4, 7, 16), dim=-1)
    out = net(x)

    assert not torch.allclose(out, mean_aggregate(x), atol=1e-3)  # not trivially the mean
    torch.testing.assert_close(net(x[:, torch.randperm(7)]), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))


def test_only_the_cls_token_is_updated() -> None:
    net = AttentionAggregator(dim=16, layers=2)
    _randomise(net, seed=1)
    x = torch.nn.functional.normalize(torch.randn(3, 5, 16), dim=-1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in net.layers:
        layer.register_forward_hook(lambda _m, args, out: seen.append((args[1], out[0])))
    out = net(x)

    assert len(seen) == 2
    for tokens, cls in seen:
        assert torch.equal(tokens, x)  # every layer attends over the untouched K embeddings
        assert cls.shape == (3, 1, 16)  # and returns one row: the CLS token
    torch.testing.assert_close(out, torch.nn.functional.normalize(seen[-1][1][:, 0], dim=-1))


def test_cls_layer_attends_over_cls_and_tokens() -> None:
    layer = CLSAttentionLayer(dim=8)
    _, attn = layer(torch.randn(2, 1, 8), torch.randn(2, 4, 8))
    assert attn.shape == (2, 1, 5)
    torch.testing.assert_close(attn, torch.full((2, 1, 5), 0.2))  # uniform at init
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 1))


def test_fusion_weight_is_a_sigmoid_and_fuses_convexly() -> None:
    fw = FusionWeight(initial=0.25)
    assert math.isclose(fw.weight.item(), 0.25, rel_tol=1e-6)
    with torch.no_grad():
        fw.p.fill_(1.3)
    lam = 1 / (1 + math.exp(-1.3))
    text, gen = torch.tensor([0.2, 0.9]), torch.tensor([0.8, -0.1])
    torch.testing.assert_close(fw.fuse(text, gen), (1 - lam) * text + lam * gen)
    fw.fuse(text, gen).sum().backward()
    assert fw.p.grad is not None and float(fw.p.grad) != 0.0
    with pytest.raises(ValueError):
        FusionWeight(initial=1.0)


def test_aggregator_round_trips_both_modes(tmp_path: Path) -> None:
    x = _unit(np.random.default_rng(1).normal(size=(3, 4, 16))).astype(np.float32)
    att = new_aggregator("attention", dim=16, initial_fusion_weight=0.3)
    _randomise(att.module.attention)  # type: ignore[arg-type]
    version = att.save(tmp_path / "agg", {"note": "test"})
    loaded = load_aggregator(f"local-dir:{tmp_path / 'agg'}")

    assert loaded.model_version == version and loaded.mode == "attention"
    np.testing.assert_allclose(loaded.aggregate(x), att.aggregate(x), atol=1e-6)
    assert math.isclose(loaded.fusion_weight, 0.3, rel_tol=1e-5)
    np.testing.assert_allclose(loaded.fuse(np.ones(2), np.zeros(2)), [0.7, 0.7], atol=1e-5)

    mean = new_aggregator("mean", initial_fusion_weight=0.6)
    mean.save(tmp_path / "mean", {})
    loaded_mean = load_aggregator(f"local-dir:{tmp_path / 'mean'}")
    np.testing.assert_allclose(loaded_mean.aggregate(x), _unit(x.mean(axis=1)), atol=1e-6)
    assert math.isclose(loaded_mean.fusion_weight, 0.6, rel_tol=1e-5)


def test_aggregator_config_spec_and_load_errors(tmp_path: Path) -> None:
    add_model_config("test-agg", {"family": "aggregator", "mode": "attention", "dim": 8})
    agg = load_aggregator("config:test-agg")
    assert agg.model_version == "test-agg-random0"
    with pytest.raises(ValueError, match="dimension 8"):
        agg.aggregate(np.ones((1, 2, 4), dtype=np.float32))
    with pytest.raises(ModelLoadError, match="not an aggregator"):
        load_aggregator("config:tiny-vision")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_aggregator(f"local-dir:{tmp_path / 'none'}")
    agg.save(tmp_path / "a", {})
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(b"\0garbage")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_aggregator(f"local-dir:{tmp_path / 'a'}")
    new_aggregator("attention", dim=4).save(tmp_path / "b", {})
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps(config | {"dim": 8}))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_aggregator(f"local-dir:{tmp_path / 'b'}")


# -- aggregator training on synthetic data -------------------------------------------------------
D, G, K = 32, 8, 8


class Synthetic:
    """Groups with prototypes; of K generated views, 2-4 are failures (an artifact + a wrong class).

    The failures pull the mean toward another class; an attention aggregator can learn to
    down-weight them (they share the artifact direction).
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.protos = _unit(self.rng.normal(size=(G, D)))
        self.artifact = _unit(self.rng.normal(size=D))
        self.gallery_groups = self.rng.integers(0, G, 400)
        self.gallery = self._noisy(self.protos[self.gallery_groups], 0.35)

    def _noisy(self, x: np.ndarray, sigma: float) -> np.ndarray:
        return _unit(x + sigma * self.rng.normal(size=x.shape))

    def queries(self, n: int) -> tuple[np.ndarray, list[int]]:
        groups = self.rng.integers(0, G, n)
        x = self._noisy(np.repeat(self.protos[groups][:, None], K, axis=1), 0.4)
        for i in range(n):
            m = int(self.rng.integers(2, 5))
            wrong = (groups[i] + self.rng.integers(1, G)) % G
            x[i, :m] = self._noisy(np.tile(self.artifact + 0.8 * self.protos[wrong], (m, 1)), 0.2)
            x[i] = x[i, self.rng.permutation(K)]
        return x.astype(np.float32), [int(g) for g in groups]

    def text_scores(self, groups: list[int], informative: bool) -> np.ndarray:
        noise = self.rng.normal(size=(len(groups), len(self.gallery)))
        if not informative:
            return noise.astype(np.float32)
        same = np.asarray(groups)[:, None] == self.gallery_groups[None, :]
        return (0.3 * same + 0.2 * noise).astype(np.float32)


def _gen_map(agg: Aggregator, data: Synthetic, x: np.ndarray, groups: list[int]) -> float:
    scores = agg.aggregate(x) @ data.gallery.T
    return retrieval_map(scores, groups, list(data.gallery_groups))


def test_trained_attention_aggregator_beats_mean_pooling_on_held_out_queries() -> None:
    data = Synthetic(0)
    train_x, train_g = data.queries(160)
    test_x, test_g = data.queries(160)
    agg, metrics = train_aggregator(
        train_x,
        train_g,
        data.gallery,
        list(data.gallery_groups),
        data.text_scores(train_g, informative=False),
        epochs=40,
        seed=0,
    )
    mean_map = _gen_map(new_aggregator("mean"), data, test_x, test_g)
    att_map = _gen_map(agg, data, test_x, test_g)

    assert metrics["before"]["mAP_generated"] == pytest.approx(
        metrics["before"]["mAP_generated_mean"]
    )
    assert metrics["loss_after"] < metrics["loss_before"]
    assert att_map > mean_map + 0.15, (att_map, mean_map)


@pytest.mark.parametrize("noisy_path", ["text", "generated"])
def test_fusion_weight_moves_toward_the_informative_path(noisy_path: str) -> None:
    data = Synthetic(1)
    x, groups = data.queries(120)
    if noisy_path == "generated":
        x = _unit(data.rng.normal(size=x.shape)).astype(np.float32)
    text = data.text_scores(groups, informative=noisy_path != "text")
    agg, metrics = train_aggregator(
        x,
        groups,
        data.gallery,
        list(data.gallery_groups),
        text,
        mode="mean",
        epochs=20,
        fusion_lr=0.1,
        seed=0,
    )

    if noisy_path == "text":
        assert agg.fusion_weight > 0.8  # toward the generated path
    else:
        assert agg.fusion_weight < 0.2  # toward the text path
    assert metrics["after"]["mAP_fused"] > metrics["before"]["mAP_fused"]


def test_train_aggregator_rejects_mismatched_inputs() -> None:
    data = Synthetic(2)
    x, groups = data.queries(4)
    text = data.text_scores(groups, informative=True)
    gal_groups = list(data.gallery_groups)
    with pytest.raises(ValueError, match="dimension"):
        train_aggregator(x[..., :16], groups, data.gallery, gal_groups, text)
    with pytest.raises(ValueError, match="text_scores"):
        train_aggregator(x, groups, data.gallery, gal_groups, text[:, :10])
    with pytest.raises(ValueError, match="query groups"):
        train_aggregator(x, groups[:2], data.gallery, gal_groups, text)
    with pytest.raises(ValueError, match="no query"):
        train_aggregator(x, [99] * 4, data.gallery, gal_groups, text)


# -- the trained default checkpoint ---------------------------------------------------------------
def test_default_checkpoint_loads_and_records_its_evaluation() -> None:
    # committed: made by `imagine train --stage vision`
    path = ROOT / "checkpoints" / "fmnist-vision"
    enc = load_vision_encoder(f"local-dir:{path}", device="cpu")
    manifest = json.loads((path / MANIFEST_FILE).read_text())

    assert enc.dim == 128 and enc.model_version == manifest["model_version"]
    assert manifest["data_fingerprint"] and manifest["metrics"]["mAP"] > 0.5
    _assert_unit_float32(enc.encode_images(_images()), (3, 128))


@pytest.mark.parametrize("mode", ["mean", "attention"])
def test_in_process_evaluation_reports_the_attention_path_only_for_an_attention_aggregator(
    mode: str,
) -> None:
    from imagine.evaluation import evaluate_paths_in_process
    from imagine.models.dual_encoder import load_dual_encoder
    from imagine.models.generator import load_generator

    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), mode="L")
        for _ in range(12)
    ]
    agg = new_aggregator(mode, dim=16 if mode == "attention" else None)
    if agg.module.attention is not None:
        _randomise(agg.module.attention)  # no longer the mean
    reports = evaluate_paths_in_process(
        load_dual_encoder("config:tiny-dual", device="cpu"),
        load_vision_encoder("config:tiny-vision", device="cpu"),
        load_generator("config:tiny-generator", device="cpu"),
        agg,
        images,
        ["a", "b", "c"] * 4,
        {"a": "a bag", "b": "a shoe", "c": "a coat"},
        num_generated=2,
        steps=2,
    )
    paths = ["text", "generated (mean)", "fused"]
    if mode == "attention":  # a column of its own, not the mean under another name
        paths.insert(2, "generated (attention)")
        assert reports["generated (attention)"].ap != reports["generated (mean)"].ap
    assert list(reports) == paths
