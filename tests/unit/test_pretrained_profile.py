"""The pretrained profile: ``open_clip:ARCH@/weights`` dual encoders and ``diffusers:/dir``
generators, on same-format files built here from random initialisation (nothing downloaded)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagine.models.dual_encoder import DualEncoder, load_dual_encoder
from imagine.models.generator import DiffusersGenerator, load_generator
from imagine.models.registry import ModelLoadError, ModelSpec, file_digest

ARCH = "imagine-test-tiny-clip"
TEXTS = ["a photo of a sneaker", "a dark coat", "a pair of trousers"]
PROMPTS = ["a red coat", "a blue shoe"]
# open_clip's config format: a 1-layer ViT (32 px, 8 px patches) and a 1-layer, 32-wide text
# transformer with CLIP's context and vocabulary, so the BPE tokenizer bundled with open_clip fits
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """Nothing may come from a hub: every load here reads local files only."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), mode="L"),
        Image.new("RGB", (40, 30), (200, 10, 10)),  # other size and mode: cropped, converted
    ]


def _assert_unit_float32(vecs: np.ndarray, n: int, dim: int = 32) -> None:
    assert vecs.dtype == np.float32
    assert vecs.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


# -- open_clip -----------------------------------------------------------------------------------
def _register_arch(root: Path, name: str, config: dict[str, object]) -> None:
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny architecture registered with open_clip and its random-init weights (seed 123)
    saved as safetensors and as a torch state dict."""
    import open_clip

    root = tmp_path_factory.mktemp("open_clip")
    _register_arch(root / "configs", ARCH, TINY_CLIP)
    torch.manual_seed(123)
    model = open_clip.create_model(ARCH, pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "tiny_clip.safetensors"))
    torch.save(state, root / "tiny_clip.pt")
    return {"safetensors": root / "tiny_clip.safetensors", "pt": root / "tiny_clip.pt"}


@pytest.fixture(scope="module")
def clip(clip_weights: dict[str, Path]) -> DualEncoder:
    return load_dual_encoder(f"open_clip:{ARCH}@{clip_weights['safetensors']}", device="cpu")


def test_open_clip_spec_gives_normalised_vectors_of_the_model_dim(clip: DualEncoder) -> None:
    assert clip.dim == 32
    assert clip.image_size == 32
    _assert_unit_float32(clip.encode_text(TEXTS), len(TEXTS))
    _assert_unit_float32(clip.encode_images(_images()), 2)
    assert clip.encode_text([]).shape == (0, 32)
    assert clip.encode_images([]).shape == (0, 32)


def test_open_clip_uses_its_own_transforms_and_tokenizer(clip: DualEncoder) -> None:
    assert clip.image_tensor(_images()).shape == (2, 3, 32, 32)
    assert clip.config["preprocess_cfg"]["resize_mode"] == "shortest"  # open_clip's default
    assert clip.tokenize(["a dark coat"]).shape == (1, 77)


def test_model_version_names_the_weights_and_their_digest(
    clip: DualEncoder, clip_weights: dict[str, Path]
) -> None:
    digest = file_digest(clip_weights["safetensors"])
    assert clip.model_version == f"{ARCH}-tiny_clip-{digest}"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", clip.model_version)  # usable in collection names


def test_weights_are_really_loaded_not_reinitialised(
    clip: DualEncoder, clip_weights: dict[str, Path]
) -> None:
    # other seeds for the loader's own init: the file's weights must overwrite all of it
    again = load_dual_encoder(f"open_clip:{ARCH}@{clip_weights['safetensors']}", "cpu", seed=7)
    from_pt = load_dual_encoder(f"open_clip:{ARCH}@{clip_weights['pt']}", "cpu", seed=8)
    random = load_dual_encoder(f"open_clip:{ARCH}", device="cpu", seed=7)

    expected_text, expected_images = clip.encode_text(TEXTS), clip.encode_images(_images())
    for other in (again, from_pt):
        np.testing.assert_array_equal(other.encode_text(TEXTS), expected_text)
        np.testing.assert_array_equal(other.encode_images(_images()), expected_images)
    assert random.model_version == f"{ARCH}-random7"
    assert np.abs(random.encode_text(TEXTS) - expected_text).max() > 1e-3
    assert np.abs(random.encode_images(_images()) - expected_images).max() > 1e-3


def test_open_clip_model_round_trips_through_our_checkpoint(
    clip: DualEncoder, tmp_path: Path
) -> None:
    version = clip.save(tmp_path / "saved", {"source": "open_clip"})
    loaded = load_dual_encoder(f"local-dir:{tmp_path / 'saved'}", device="cpu")

    assert loaded.model_version == version
    np.testing.assert_array_equal(loaded.encode_text(TEXTS), clip.encode_text(TEXTS))
    np.testing.assert_array_equal(loaded.encode_images(_images()), clip.encode_images(_images()))


def test_missing_weights_file_names_the_path(clip_weights: dict[str, Path]) -> None:
    missing = clip_weights["safetensors"].parent / "nope.safetensors"
    with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
        load_dual_encoder(f"open_clip:{ARCH}@{missing}")


def test_corrupt_weights_raise(clip_weights: dict[str, Path], tmp_path: Path) -> None:
    data = clip_weights["safetensors"].read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or do not fit"):
        load_dual_encoder(f"open_clip:{ARCH}@{tmp_path / 'half.safetensors'}")


def test_weights_of_another_architecture_raise(
    clip_weights: dict[str, Path], tmp_path: Path
) -> None:
    wider = {**TINY_CLIP, "embed_dim": 16}
    _register_arch(tmp_path, f"{ARCH}-16", wider)
    with pytest.raises(ModelLoadError, match=f"do not fit '{ARCH}-16'"):
        load_dual_encoder(f"open_clip:{ARCH}-16@{clip_weights['safetensors']}")


def test_weights_file_of_an_unknown_format_raises(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not weights")
    with pytest.raises(ModelLoadError, match=r"must be a \.safetensors"):
        load_dual_encoder(f"open_clip:{ARCH}@{tmp_path / 'weights.txt'}")


def test_unknown_architecture_raises() -> None:
    with pytest.raises(ModelLoadError, match="open_clip has no architecture 'No-Such-ViT'"):
        load_dual_encoder("open_clip:No-Such-ViT")


def test_architecture_with_a_hub_tokenizer_is_refused(tmp_path: Path) -> None:
    hf_text = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "hf_tokenizer_name": "org/tok"}}
    _register_arch(tmp_path, f"{ARCH}-hf", hf_text)
    with pytest.raises(ModelLoadError, match="'org/tok', which is not a local directory"):
        load_dual_encoder(f"open_clip:{ARCH}-hf")


@pytest.mark.parametrize("spec", ["open_clip:", f"open_clip:{ARCH}@", "open_clip:@/w.pt"])
def test_bad_open_clip_specs_raise(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="bad model spec"):
        load_dual_encoder(spec)


def test_each_loader_accepts_only_its_own_schemes() -> None:
    assert ModelSpec.parse("open_clip:A@/w.pt", ("open_clip",)) == ModelSpec("open_clip", "A@/w.pt")
    with pytest.raises(ModelLoadError, match="expected 'local-dir:/path' or 'config:NAME'"):
        ModelSpec.parse("open_clip:A@/w.pt")
    with pytest.raises(ModelLoadError, match="bad model spec"):
        load_dual_encoder("diffusers:/some/pipeline")
    with pytest.raises(ModelLoadError, match="bad model spec"):
        load_generator("open_clip:ViT-B-32@/w.safetensors")


# -- diffusers -----------------------------------------------------------------------------------
def _tiny_tokenizer(root: Path) -> Any:
    """A CLIP BPE tokenizer from a vocab.json + merges.txt of single letters (and 'at')."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "at</w>"]
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\na t</w>\n")
    return CLIPTokenizer.from_pretrained(str(root), model_max_length=77)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-format pipeline directory (random init, ~2 MB), as save_pretrained
    writes it: 8x8 latents (4 channels), a 2x VAE (16x16 RGB images), a 32-wide CLIP text
    encoder, DDIM."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("diffusers")
    tokenizer = _tiny_tokenizer(root / "vocab")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(root / "tiny-sd"))
    return root / "tiny-sd"


@pytest.fixture(scope="module")
def sd(sd_dir: Path) -> DiffusersGenerator:
    generator = load_generator(f"diffusers:{sd_dir}", device="cpu")
    assert isinstance(generator, DiffusersGenerator)
    return generator


def _pixels(batch: list[list[Image.Image]]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for images in batch for img in images])


def test_diffusers_spec_gives_k_images_per_prompt(sd: DiffusersGenerator) -> None:
    out = sd.generate(PROMPTS, num_images=2, steps=2, seed=0)

    assert [len(images) for images in out] == [2, 2]
    for img in (img for images in out for img in images):
        assert isinstance(img, Image.Image)
        assert img.size == (16, 16)
        assert img.mode == "RGB"
    assert sd.image_size == 16
    assert sd.generate([], num_images=2, steps=2) == []


def test_same_seed_gives_identical_pixels_another_seed_others(sd: DiffusersGenerator) -> None:
    first = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, guidance=2.0, seed=0))
    again = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, guidance=2.0, seed=0))
    other = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, guidance=2.0, seed=1))

    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0
    assert np.abs(first[0] - first[1]).max() > 0  # the K images of a prompt differ


def test_per_query_seeds_as_the_deployment_passes_them(sd: DiffusersGenerator) -> None:
    """services/deployments.py batches queries with one seed each: [0, 1] gives prompt 0 the
    images of seed 0 and prompt 1 those of seed 1 (up to float rounding of the batch)."""
    mixed = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, seed=[0, 1]))
    seed0 = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, seed=0))
    seed1 = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, seed=1))

    assert np.abs(mixed[:2] - seed0[:2]).max() <= 1
    assert np.abs(mixed[2:] - seed1[2:]).max() <= 1
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        sd.generate(PROMPTS, num_images=2, steps=2, seed=[0])


def test_diffusers_pipeline_served_in_bfloat16(sd: DiffusersGenerator, sd_dir: Path) -> None:
    bf16 = load_generator(f"diffusers:{sd_dir}", device="cpu", precision="bfloat16")
    assert isinstance(bf16, DiffusersGenerator)

    first = _pixels(bf16.generate(PROMPTS, num_images=2, steps=2, seed=0))
    again = _pixels(bf16.generate(PROMPTS, num_images=2, steps=2, seed=0))
    fp32 = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, seed=0))
    other = _pixels(sd.generate(PROMPTS, num_images=2, steps=2, seed=1))

    assert bf16.precision == "bfloat16"
    assert {p.dtype for p in bf16.pipeline.unet.parameters()} == {torch.bfloat16}
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - fp32).mean() < np.abs(other - fp32).mean() / 4


def test_diffusers_weights_are_loaded_and_versioned(sd: DiffusersGenerator, sd_dir: Path) -> None:
    again = load_generator(f"diffusers:{sd_dir}", device="cpu", seed=5)

    assert again.model_version == sd.model_version
    assert re.fullmatch(r"tiny-sd-[0-9a-f]{12}", sd.model_version)
    np.testing.assert_array_equal(
        _pixels(again.generate(PROMPTS[:1], num_images=1, steps=2, seed=3)),
        _pixels(sd.generate(PROMPTS[:1], num_images=1, steps=2, seed=3)),
    )


def test_missing_pipeline_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        load_generator(f"diffusers:{tmp_path / 'nope'}")


def test_dir_without_model_index_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no model_index\.json"):
        load_generator(f"diffusers:{tmp_path}")


def test_pipeline_missing_a_component_raises(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="is missing vae"):
        load_generator(f"diffusers:{broken}")


def test_corrupt_pipeline_raises(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="is corrupt"):
        load_generator(f"diffusers:{broken}")


def test_corrupt_model_index_raises(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt JSON"):
        load_generator(f"diffusers:{broken}")


def test_our_own_generator_dir_points_to_local_dir(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ImaginePipeline"}))
    with pytest.raises(ModelLoadError, match="use 'local-dir:"):
        load_generator(f"diffusers:{tmp_path}")


def test_generator_deployment_serves_a_diffusers_pipeline(sd_dir: Path) -> None:
    """The deployment's own class, outside Serve (``@serve.batch`` needs a replica): a diffusers
    pipeline has no shared loop, so each group of queries with the same settings runs one
    pipeline call, every query with its own seed."""
    from services.deployments import Generator as GeneratorDeployment

    replica = GeneratorDeployment.func_or_class(f"diffusers:{sd_dir}", 4, 0.0, 1, "float32")
    shoe, bag, other = replica._whole_loops(
        [("a red shoe", 2, 2, 2.0, 0), ("a blue bag", 1, 2, 2.0, 1), ("a hat", 1, 3, 1.0, 2)]
    )
    alone = load_generator(f"diffusers:{sd_dir}", device="cpu").generate(
        ["a red shoe"], num_images=2, steps=2, guidance=2.0, seed=0
    )

    assert replica.loop is None
    assert "passes" not in replica.batch_stats()
    assert (len(shoe), len(bag), len(other)) == (2, 1, 1)
    assert np.abs(_pixels([shoe]) - _pixels(alone)).max() <= 1
