"""Image-to-text over real gRPC with tiny models: the CaptionDecoder deployment, captions and
caption vectors at ingest, text galleries, image queries over text and image galleries, and the
CLI's `caption`, `search --image` and `ingest --texts`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from imagine.client import state_name
from tests.conftest import Stack, make_gallery, start_stack

pytestmark = pytest.mark.integration
N = 24
TINY = {
    "IMAGINE_CAPTION_MODEL": "config:tiny-captioner",
    "IMAGINE_VISION_MODEL": "config:tiny-vision",
}
TEXTS = [
    {"id": "t1", "text": "a dark wide coat with a visible pattern", "label": "Coat"},
    {"id": "t2", "text": "a light narrow pair of trousers in a plain colour", "label": "Trouser"},
    {"id": "t3", "text": "a grey sneaker in a plain colour", "label": "Sneaker"},
    {"id": "t4", "text": "a light bag with a visible pattern", "label": "Bag"},
    {"id": "t5", "text": "a dark ankle boot in a plain colour", "label": "Ankle boot"},
]


def _unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


@pytest.fixture(scope="module")
def cap_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("cap-stack"), TINY)
    yield stack
    assert stack.stop() == 0, stack.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gallery(tmp_path_factory.mktemp("g"), N)


@pytest.fixture(scope="module")
def images(cap_stack: Stack, gallery: Path) -> str:
    with cap_stack.client() as c:
        job = c.wait_job(c.create_ingest_job(str(gallery), "imgs").id, timeout_s=300)
        assert state_name(job.state) == "SUCCEEDED", job
        col = c.describe_collection("imgs")
        assert {v.name: v.size for v in col.vectors} == {"image": 32, "visual": 16, "caption": 32}
        assert "tiny-captioner-random0" in col.model_version  # the decoder names the version
    return "imgs"


@pytest.fixture(scope="module")
def texts(cap_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("t") / "texts.jsonl"
    lines = [json.dumps(t) for t in TEXTS] + ["not json", json.dumps({"id": "empty", "text": ""})]
    path.write_text("\n".join(lines) + "\n")
    out = cap_stack.cli("ingest", str(path), "--texts", "--collection", "texts")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCEEDED_WITH_ERRORS" in out.stdout  # two bad lines
    assert "5 embedded" in out.stdout and "2 failed" in out.stdout, out.stdout
    assert "not JSON" in out.stdout and "non-empty string 'text'" in out.stdout, out.stdout
    with cap_stack.client() as c:
        col = c.describe_collection("texts")
        assert {v.name: v.size for v in col.vectors} == {"text": 32}
        assert col.points_count == len(TEXTS)
    return "texts"


def test_caption_rpc_decodes_per_request(cap_stack: Stack, gallery: Path) -> None:
    blobs = [(gallery / f"{i:05d}.png").read_bytes() for i in range(3)]
    with cap_stack.client() as c:
        greedy, version = c.caption(blobs, "greedy")
        again, _ = c.caption(blobs)  # unspecified: greedy
        beam, _ = c.caption(blobs, "beam", beam_size=3)
        beam1, _ = c.caption(blobs, "beam", beam_size=1)
        s1, _ = c.caption(blobs, "sample", temperature=1.5, seed=7)
        s2, _ = c.caption(blobs, "sample", temperature=1.5, seed=7)
        s3, _ = c.caption(blobs, "sample", temperature=1.5, seed=8)
    assert version == "tiny-captioner-random0"
    assert all(cap.text and cap.log_prob < 0 and not cap.error for cap in greedy + beam + s1)
    assert [x.text for x in greedy] == [x.text for x in again]
    assert [(x.text, x.log_prob) for x in s1] == [(x.text, x.log_prob) for x in s2]
    assert [x.text for x in s1] != [x.text for x in s3]  # another seed, other words
    # a beam of one is greedy decoding: same words, same log-probability
    for b1, g in zip(beam1, greedy, strict=True):
        assert (b1.text, b1.log_prob) == (g.text, pytest.approx(g.log_prob, abs=1e-3))


def test_caption_rpc_errors(cap_stack: Stack, gallery: Path) -> None:
    good = (gallery / "00000.png").read_bytes()
    with cap_stack.client() as c:
        caps, _ = c.caption([good, b"not an image"])
        assert caps[0].text and not caps[0].error
        assert caps[1].error and not caps[1].text
        for kwargs, word in [
            ({"strategy": "beam", "beam_size": 99}, "beam_size"),
            ({"strategy": "sample", "temperature": -1.0}, "temperature"),
        ]:
            with pytest.raises(grpc.RpcError) as exc:
                c.caption([good], **kwargs)  # type: ignore[arg-type]
            assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert word in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            c.caption([])
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_ingested_images_carry_their_caption(cap_stack: Stack, images: str, gallery: Path) -> None:
    with cap_stack.client() as c:
        resp = c.search("a photo of a bag", collection=images, top_k=N, weights={"caption": 0.4})
        assert set(resp.weights) == {"text", "caption"}
        assert resp.weights["caption"] == pytest.approx(0.4 / 1.4)
        (qvec,), _ = c.encode_text(["a photo of a bag"])
        hit = resp.hits[0]
        caption = hit.payload.fields["caption"].string_value
        (cvec,), _ = c.encode_text([caption])
        expected, _ = c.caption([(gallery / hit.payload.fields["key"].string_value).read_bytes()])
    assert len(resp.hits) == N
    assert caption == expected[0].text  # the greedy caption of that very image
    assert hit.path_scores["caption"] == pytest.approx(float(_unit(qvec) @ _unit(cvec)), abs=1e-4)
    for h in resp.hits:
        fused = sum(resp.weights[p] * h.path_scores[p] for p in resp.weights)
        assert h.score == pytest.approx(fused, abs=1e-4)
    # without a weight the caption path stays out of text -> image search (IMAGINE_CAPTION_WEIGHT=0)
    with cap_stack.client() as c:
        plain = c.search("a photo of a bag", collection=images, top_k=3)
    assert set(plain.weights) == {"text"}


def test_image_query_over_a_text_gallery_fuses_image_and_caption(
    cap_stack: Stack, texts: str, gallery: Path
) -> None:
    query = (gallery / "00003.png").read_bytes()
    with cap_stack.client() as c:
        resp = c.search(collection=texts, image=query, top_k=10)
        (img_vec,), _ = c.encode_images([query])
        (cap_vec,), _ = c.encode_text([resp.query_caption])
        text_vecs, _ = c.encode_text([h.payload.fields["text"].string_value for h in resp.hits])
        only_image = c.search(collection=texts, image=query, top_k=10, weights={"caption": 0})
    assert resp.query_caption
    assert resp.weights == pytest.approx({"image": 0.5, "caption": 0.5})
    assert len(resp.hits) == len(TEXTS)
    assert {h.payload.fields["text"].string_value for h in resp.hits} == {t["text"] for t in TEXTS}
    for h, tv in zip(resp.hits, text_vecs, strict=True):
        assert h.path_scores["image"] == pytest.approx(float(_unit(img_vec) @ _unit(tv)), abs=1e-4)
        assert h.path_scores["caption"] == pytest.approx(
            float(_unit(cap_vec) @ _unit(tv)), abs=1e-4
        )
        assert h.score == pytest.approx(
            0.5 * h.path_scores["image"] + 0.5 * h.path_scores["caption"], abs=1e-4
        )
    assert set(only_image.weights) == {"image"}
    ranked = sorted(resp.hits, key=lambda h: -h.path_scores["image"])
    assert [h.id for h in only_image.hits] == [h.id for h in ranked]


def test_image_query_over_an_image_gallery_finds_the_image(
    cap_stack: Stack, images: str, gallery: Path
) -> None:
    for i in (0, 5, 11):
        query = (gallery / f"{i:05d}.png").read_bytes()
        with cap_stack.client() as c:
            resp = c.search(collection=images, image=query, top_k=5)
        assert set(resp.weights) == {"image", "caption"}
        top = resp.hits[0]
        assert top.payload.fields["key"].string_value == f"{i:05d}.png"
        assert top.path_scores["image"] == pytest.approx(1.0, abs=1e-4)
        assert top.path_scores["caption"] == pytest.approx(1.0, abs=1e-4)  # its own caption


def test_image_query_over_the_vision_only_vectors(
    cap_stack: Stack, images: str, gallery: Path
) -> None:
    """A request that weights "visual" adds image -> image over the vision-only encoder."""
    query = (gallery / "00007.png").read_bytes()
    with cap_stack.client() as c:
        resp = c.search(collection=images, image=query, top_k=N, weights={"visual": 1.0})
        only = c.search(
            collection=images, image=query, top_k=N, weights={"visual": 1, "image": 0, "caption": 0}
        )
        (vis,), _ = c.encode_images([(gallery / "00010.png").read_bytes()], "visual")
        (qvis,), _ = c.encode_images([query], "visual")
    assert set(resp.weights) == {"image", "caption", "visual"}
    assert resp.weights["visual"] == pytest.approx(0.5)
    assert only.weights == {"visual": 1.0}
    assert only.hits[0].payload.fields["key"].string_value == "00007.png"
    assert only.hits[0].path_scores["visual"] == pytest.approx(1.0, abs=1e-4)
    other = next(h for h in only.hits if h.payload.fields["key"].string_value == "00010.png")
    assert other.path_scores["visual"] == pytest.approx(float(_unit(qvis) @ _unit(vis)), abs=1e-4)


def test_text_queries_and_image_ingest_are_refused_on_a_text_gallery(
    cap_stack: Stack, texts: str, gallery: Path
) -> None:
    with cap_stack.client() as c:
        with pytest.raises(grpc.RpcError) as exc:
            c.search("a coat", collection=texts)
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "text gallery" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            c.create_ingest_job(str(gallery), texts)
        assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as exc:
            c.search(collection=texts, image=b"not an image")
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        query = (gallery / "00000.png").read_bytes()
        with pytest.raises(grpc.RpcError) as exc:  # a text gallery has no visual vectors
            c.search(collection=texts, image=query, weights={"visual": 1.0})
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "visual" in exc.value.details()


def test_cli_caption_and_image_search(
    cap_stack: Stack, images: str, texts: str, gallery: Path
) -> None:
    path = str(gallery / "00005.png")
    out = cap_stack.cli("caption", path, "--strategy", "beam", "--beam", "2")
    assert out.returncode == 0, out.stderr
    assert "tiny-captioner-random0" in out.stdout and "log p = -" in out.stdout
    with cap_stack.client() as c:
        (cap,), _ = c.caption([(gallery / "00005.png").read_bytes()], "beam", beam_size=2)
    assert f"{path}: {cap.text}" in out.stdout

    out = cap_stack.cli("search", "--image", path, "--collection", texts, "--k", "3")
    assert out.returncode == 0, out.stderr
    assert "3 hits" in out.stdout and "query caption:" in out.stdout
    assert sum(line.strip().startswith("text: ") for line in out.stdout.splitlines()) == 3

    out = cap_stack.cli("search", "--image", path, "--collection", images, "--k", "2")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[2]
    assert "00005.png" in first and "image=1.000" in first, out.stdout
    assert "caption: " in out.stdout

    out = cap_stack.cli("search", "--image", "/nonexistent.png", "--collection", images)
    assert out.returncode != 0 and "not found" in out.stderr


def test_text_objects_in_a_folder_and_reingest_skips_unchanged(
    cap_stack: Stack, tmp_path: Path, gallery: Path
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("a light bag with a visible pattern\n")
    (folder / "b.txt").write_text("a dark coat")
    (folder / "photo.png").write_bytes((gallery / "00000.png").read_bytes())
    with cap_stack.client() as c:
        job = c.wait_job(c.create_ingest_job(str(folder), "notes", kind="texts").id)
        assert (job.embedded, job.failed) == (2, 1), job
        assert "not a text object" in job.failures[0].reason
        again = c.wait_job(c.create_ingest_job(str(folder), "notes", kind="texts").id)
        assert (again.embedded, again.skipped) == (0, 2), again
        resp = c.search(collection="notes", image=(gallery / "00000.png").read_bytes(), top_k=5)
    texts = {h.payload.fields["text"].string_value for h in resp.hits}
    assert texts == {"a light bag with a visible pattern", "a dark coat"}
