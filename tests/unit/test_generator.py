"""The diffusion generator with the tiny config (2-level UNet, 1-layer BERT): no Ray, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.models.generator import UNET_WEIGHTS, Generator, load_generator, resolve_precision
from imagine.models.registry import ModelLoadError

PROMPTS = ["a photo of a sneaker", "a dark coat", "a pair of trousers"]
STEPS = 4


@pytest.fixture(scope="module")
def generator() -> Generator:
    return load_generator("config:tiny-generator", device="cpu")


@pytest.fixture(scope="module")
def saved(generator: Generator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "tiny-gen"
    generator.save(path, {"dataset": "fashion-mnist", "steps": 0})
    return path


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def test_generate_gives_num_images_grey_images_per_prompt(generator: Generator) -> None:
    out = generator.generate(PROMPTS[:2], num_images=3, steps=STEPS)

    assert generator.image_size == 28
    assert generator.model_version == "tiny-generator-random0"
    assert [len(row) for row in out] == [3, 3]
    for img in (img for row in out for img in row):
        assert isinstance(img, Image.Image)
        assert img.mode == "L"
        assert img.size == (28, 28)
    assert generator.generate([], num_images=2, steps=STEPS) == []


def test_same_seed_gives_identical_pixels_and_other_seeds_differ(generator: Generator) -> None:
    first = pixels(generator.generate(PROMPTS[:1], num_images=2, steps=STEPS, seed=7)[0])
    again = pixels(generator.generate(PROMPTS[:1], num_images=2, steps=STEPS, seed=7)[0])
    other = pixels(generator.generate(PROMPTS[:1], num_images=2, steps=STEPS, seed=8)[0])

    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 5  # different noise, visibly different images
    assert np.abs(first[0] - first[1]).mean() > 5  # the K images of one query differ too


def test_a_prompts_images_do_not_depend_on_the_rest_of_the_batch(generator: Generator) -> None:
    batched = generator.generate(PROMPTS, num_images=2, steps=STEPS, seed=3)
    alone = generator.generate(PROMPTS[1:2], num_images=2, steps=STEPS, seed=3)
    reordered = generator.generate(PROMPTS[::-1], num_images=2, steps=STEPS, seed=3)

    # Identical up to float rounding in the batched BLAS kernels: at most one grey level.
    for other in (alone[0], reordered[1]):
        diff = np.abs(pixels(batched[1]) - pixels(other))
        assert diff.max() <= 1
        assert diff.mean() < 0.05
    # ... while another prompt under the same seed gives other pixels.
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).mean() > 1


def test_guidance_changes_the_images(generator: Generator) -> None:
    plain = pixels(generator.generate(PROMPTS[:1], num_images=2, steps=STEPS, guidance=1.0)[0])
    guided = pixels(generator.generate(PROMPTS[:1], num_images=2, steps=STEPS, guidance=3.0)[0])

    assert np.abs(plain - guided).mean() > 1


def test_bfloat16_unet_is_deterministic_batch_independent_and_near_float32(
    generator: Generator,
) -> None:
    bf16 = load_generator("config:tiny-generator", device="cpu", precision="bfloat16")
    unet_dtype = next(bf16.pipeline.unet.parameters()).dtype
    text_dtype = next(bf16.text.model.parameters()).dtype

    batched = bf16.generate(PROMPTS, num_images=2, steps=STEPS, seed=3)
    again = bf16.generate(PROMPTS, num_images=2, steps=STEPS, seed=3)
    alone = bf16.generate(PROMPTS[1:2], num_images=2, steps=STEPS, seed=3)
    fp32 = generator.generate(PROMPTS, num_images=2, steps=STEPS, seed=3)
    other_seed = bf16.generate(PROMPTS, num_images=2, steps=STEPS, seed=4)

    assert (bf16.precision, unet_dtype, text_dtype) == ("bfloat16", torch.bfloat16, torch.float32)
    for row, row_again in zip(batched, again, strict=True):
        np.testing.assert_array_equal(pixels(row), pixels(row_again))
    assert np.abs(pixels(batched[1]) - pixels(alone[0])).max() <= 1

    # Rounding, not another image: far closer to float32's pixels than another seed is (on
    # this random tiny UNet; the trained one differs from float32 by 0.6 grey levels on average).
    def distance(xs: list[list[Image.Image]], ys: list[list[Image.Image]]) -> float:
        pairs = zip(xs, ys, strict=True)
        return float(np.mean([np.abs(pixels(x) - pixels(y)).mean() for x, y in pairs]))

    assert distance(batched, fp32) < distance(batched, other_seed) / 4


def test_precision_names(generator: Generator) -> None:
    assert generator.precision == "float32"  # the library default; services default to auto
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cpu") in {"float32", "bfloat16"}
    assert resolve_precision("auto", "mps") == "float32"
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        load_generator("config:tiny-generator", device="cpu", precision="half")


def test_save_load_round_trip_keeps_images_and_version(generator: Generator, saved: Path) -> None:
    loaded = load_generator(f"local-dir:{saved}", device="cpu")
    manifest = json.loads((saved / "manifest.json").read_text())

    assert loaded.model_version == manifest["model_version"]
    assert loaded.model_version.startswith("tiny-gen-")
    assert manifest["dataset"] == "fashion-mnist"
    before = generator.generate(PROMPTS[:2], num_images=2, steps=STEPS, seed=5)
    after = loaded.generate(PROMPTS[:2], num_images=2, steps=STEPS, seed=5)
    for row_b, row_a in zip(before, after, strict=True):
        np.testing.assert_array_equal(pixels(row_b), pixels(row_a))


def test_missing_directory_is_a_clear_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_generator(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(ModelLoadError, match="missing"):
        load_generator(f"local-dir:{tmp_path}")


def test_corrupt_weights_are_a_clear_load_error(saved: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for src in saved.rglob("*"):
        if src.is_file():
            dst = broken / src.relative_to(saved)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    weights = broken / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with pytest.raises(ModelLoadError, match="corrupt"):
        load_generator(f"local-dir:{broken}")


def test_unknown_config_and_other_families_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model config"):
        load_generator("config:no-such-generator")
    with pytest.raises(ModelLoadError, match="not 'generator'"):
        load_generator("config:tiny-dual")


@pytest.fixture(scope="module")
def distilled() -> Generator:
    """The tiny generator with a guidance input (``time_cond_proj_dim``), as guidance
    distillation makes it: random weights, so the guidance embedding already matters."""
    from imagine.models.generator import build_pipeline
    from imagine.models.registry import get_model_config

    config = get_model_config("tiny-generator")
    config["unet"] = {**config["unet"], "time_cond_proj_dim": 8}
    return Generator(build_pipeline(config, seed=1), "tiny-distilled", "cpu")


def test_a_guidance_distilled_unet_runs_one_pass_of_k_rows(distilled: Generator) -> None:
    rows: list[int] = []
    hook = distilled.pipeline.unet.register_forward_pre_hook(
        lambda _module, args: rows.append(len(args[0]))
    )
    try:
        guided = pixels(distilled.generate(PROMPTS[:1], num_images=3, steps=STEPS, seed=4)[0])
    finally:
        hook.remove()
    again = pixels(distilled.generate(PROMPTS[:1], num_images=3, steps=STEPS, seed=4)[0])
    plain = pixels(
        distilled.generate(PROMPTS[:1], num_images=3, steps=STEPS, guidance=1.0, seed=4)[0]
    )

    assert rows == [3] * STEPS  # K rows a pass, no unconditional branch
    np.testing.assert_array_equal(guided, again)
    assert np.abs(guided - plain).mean() > 1  # the scale reaches the UNet


def test_distilled_queries_with_other_guidance_share_a_pass_and_keep_their_images(
    distilled: Generator,
) -> None:
    from imagine.models.generator import DenoisingLoop

    loop = DenoisingLoop(distilled, max_jobs=4)
    strong = loop.submit(PROMPTS[0], 2, STEPS, 3.0, 5)
    weak = loop.submit(PROMPTS[1], 2, STEPS, 1.5, 6)
    while loop.run_pass():
        pass

    assert loop.passes == STEPS
    for future, prompt, scale, seed in ((strong, 0, 3.0, 5), (weak, 1, 1.5, 6)):
        alone = distilled.generate(PROMPTS[prompt : prompt + 1], 2, STEPS, scale, seed)[0]
        assert np.abs(pixels(future.result(0)) - pixels(alone)).max() <= 1
