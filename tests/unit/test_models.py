"""The model registry and the dual encoder, with the tiny config (1-layer BERT, tiny ViT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from imagine.models.dual_encoder import LOCKED_PREFIX, DualEncoder, load_dual_encoder
from imagine.models.registry import (
    ModelLoadError,
    ModelSpec,
    add_model_config,
    get_model_config,
    list_model_configs,
)

TEXTS = ["a photo of a sneaker", "a dark coat", "a pair of trousers"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), mode="L"),
        Image.new("RGB", (40, 30), (200, 10, 10)),  # other size and mode: resized, converted
        Image.new("L", (28, 28), 0),
    ]


@pytest.fixture(scope="module")
def encoder() -> DualEncoder:
    return load_dual_encoder("config:tiny-dual", device="cpu")


@pytest.fixture(scope="module")
def checkpoint(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-run"
    encoder.save(path, {"dataset": "fashion-mnist", "epochs": 0})
    return path


def _assert_unit_float32(vecs: np.ndarray, n: int) -> None:
    assert vecs.dtype == np.float32
    assert vecs.shape == (n, 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


# -- encoding ----------------------------------------------------------------------------------
def test_tiny_config_is_registered_and_names_its_version(encoder: DualEncoder) -> None:
    assert "tiny-dual" in list_model_configs()
    assert encoder.dim == 32
    assert encoder.model_version == "tiny-dual-random0"


def test_encode_text_gives_normalised_deterministic_vectors(encoder: DualEncoder) -> None:
    vecs = encoder.encode_text(TEXTS)

    _assert_unit_float32(vecs, 3)
    np.testing.assert_array_equal(vecs, encoder.encode_text(TEXTS))
    # Each text is encoded on its own: batching does not change a vector.
    np.testing.assert_allclose(encoder.encode_text(TEXTS[1:2])[0], vecs[1], atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])


def test_encode_text_with_repeats_and_short_texts_matches_full_length_encoding(
    encoder: DualEncoder,
) -> None:
    """Repeated texts are encoded once and padding is cut: the vectors must not change."""
    import torch

    texts = ["bag", "a long description of a warm winter coat with a hood", "bag", "a dark coat"]
    with torch.inference_mode():
        full = encoder.model.encode_text(encoder.tokenize(texts), normalize=True).numpy()
    assert (encoder.tokenize(texts)[0] == 0).any()  # "bag" is padded to the context length

    vecs = encoder.encode_text(texts)

    _assert_unit_float32(vecs, 4)
    np.testing.assert_allclose(vecs, full, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])
    np.testing.assert_allclose(encoder.encode_text(["bag"])[0], vecs[0], atol=1e-5)


def test_encode_images_gives_normalised_deterministic_vectors(encoder: DualEncoder) -> None:
    vecs = encoder.encode_images(_images())

    _assert_unit_float32(vecs, 3)
    np.testing.assert_array_equal(vecs, encoder.encode_images(_images()))
    np.testing.assert_allclose(encoder.encode_images(_images()[2:])[0], vecs[2], atol=1e-5)
    assert not np.allclose(vecs[0], vecs[2])


def test_empty_inputs_give_empty_batches(encoder: DualEncoder) -> None:
    assert encoder.encode_text([]).shape == (0, 32)
    assert encoder.encode_images([]).shape == (0, 32)


def test_same_config_and_seed_give_the_same_model(encoder: DualEncoder) -> None:
    again = load_dual_encoder("config:tiny-dual", device="cpu", seed=0)
    np.testing.assert_array_equal(again.encode_text(TEXTS), encoder.encode_text(TEXTS))
    np.testing.assert_array_equal(again.encode_images(_images()), encoder.encode_images(_images()))


# -- checkpoints -------------------------------------------------------------------------------
def test_save_writes_config_weights_and_manifest_with_version(
    encoder: DualEncoder, checkpoint: Path
) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["dataset"] == "fashion-mnist"
    assert manifest["epochs"] == 0
    assert manifest["model_version"].startswith("tiny-run-")
    assert json.loads((checkpoint / "config.json").read_text()) == encoder.config


def test_checkpoint_keeps_a_text_tower_that_no_package_provides(checkpoint: Path) -> None:
    keys = set(load_file(str(checkpoint / "model.safetensors")))

    assert [k for k in keys if k.startswith(LOCKED_PREFIX)]  # tiny-bert is random: kept
    assert any(k.startswith("visual.") for k in keys)


def test_default_checkpoint_leaves_out_the_packaged_text_transformer() -> None:
    from imagine.config import DEFAULT_MODEL

    root = Path(DEFAULT_MODEL.removeprefix("local-dir:"))
    keys = set(load_file(str(root / "model.safetensors")))
    assert not [k for k in keys if k.startswith(LOCKED_PREFIX)]  # loaded from its package
    assert any(k.startswith("visual.") for k in keys)
    assert any(k.startswith("text.proj") for k in keys)  # the trainable projection is kept
    assert (root / "model.safetensors").stat().st_size < 10 * 1024 * 1024


def test_round_trip_gives_the_same_image_vectors_and_manifest_version(
    encoder: DualEncoder, checkpoint: Path
) -> None:
    loaded = load_dual_encoder(f"local-dir:{checkpoint}", device="cpu")

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert loaded.model_version == manifest["model_version"]
    assert loaded.config == encoder.config
    np.testing.assert_array_equal(loaded.encode_images(_images()), encoder.encode_images(_images()))


def test_round_trip_gives_the_same_text_vectors(encoder: DualEncoder, checkpoint: Path) -> None:
    """A locked tower that is not loaded from a package (tiny-bert) is kept in the checkpoint."""
    loaded = load_dual_encoder(f"local-dir:{checkpoint}", device="cpu")
    np.testing.assert_allclose(loaded.encode_text(TEXTS), encoder.encode_text(TEXTS), atol=1e-6)


def test_unlocked_config_keeps_text_weights_and_round_trips(tmp_path: Path) -> None:
    config = get_model_config("tiny-dual")
    config["lock_text"] = False
    add_model_config("tiny-dual-unlocked", config)
    assert "tiny-dual-unlocked" in list_model_configs()

    model = load_dual_encoder("config:tiny-dual-unlocked", device="cpu", seed=3)
    assert model.model_version == "tiny-dual-unlocked-random3"
    version = model.save(tmp_path / "unlocked", {})
    keys = set(load_file(str(tmp_path / "unlocked" / "model.safetensors")))
    assert any(k.startswith(LOCKED_PREFIX) for k in keys)

    loaded = load_dual_encoder(f"local-dir:{tmp_path / 'unlocked'}", device="cpu")
    assert loaded.model_version == version
    np.testing.assert_array_equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    np.testing.assert_array_equal(loaded.encode_images(_images()), model.encode_images(_images()))


def test_add_model_config_copies_its_argument() -> None:
    config = get_model_config("tiny-dual")
    add_model_config("tiny-dual-copy", config)
    config["embed_dim"] = 999
    assert get_model_config("tiny-dual-copy")["embed_dim"] == 32


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["nope", "config:", "local-dir:", "hf:bert-base", ":x"])
def test_bad_spec_string_raises(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="bad model spec"):
        load_dual_encoder(spec)


def test_spec_parses_scheme_and_target() -> None:
    assert ModelSpec.parse("local-dir:/a:b") == ModelSpec("local-dir", "/a:b")
    assert ModelSpec.parse("config:tiny-dual") == ModelSpec("config", "tiny-dual")


def test_unknown_config_name_lists_known_configs() -> None:
    with pytest.raises(ModelLoadError, match="unknown model config 'nope'") as exc:
        load_dual_encoder("config:nope")
    assert "tiny-dual" in str(exc.value)


def test_missing_checkpoint_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_dual_encoder(f"local-dir:{tmp_path / 'missing'}")


def test_checkpoint_without_weights_raises(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())

    with pytest.raises(ModelLoadError, match=r"missing model\.safetensors"):
        load_dual_encoder(f"local-dir:{tmp_path}")


def test_empty_checkpoint_dir_names_both_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"missing config\.json, model\.safetensors"):
        load_dual_encoder(f"local-dir:{tmp_path}")


def test_corrupt_weights_raise(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    weights = (checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 3])

    with pytest.raises(ModelLoadError, match="is corrupt"):
        load_dual_encoder(f"local-dir:{tmp_path}")


def test_garbage_weights_raise(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)

    with pytest.raises(ModelLoadError, match="is corrupt"):
        load_dual_encoder(f"local-dir:{tmp_path}")


def test_corrupt_config_json_raises(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())

    with pytest.raises(ModelLoadError, match="corrupt JSON"):
        load_dual_encoder(f"local-dir:{tmp_path}")


def test_checkpoint_of_another_family_raises(tmp_path: Path, checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["family"] = "generator"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())

    with pytest.raises(ModelLoadError, match="not a dual encoder"):
        load_dual_encoder(f"local-dir:{tmp_path}")


def test_weights_of_another_architecture_raise(tmp_path: Path, checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_cfg"] = {**config["vision_cfg"], "layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())

    with pytest.raises(ModelLoadError, match="does not match its config"):
        load_dual_encoder(f"local-dir:{tmp_path}")
