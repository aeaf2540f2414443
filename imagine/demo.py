"""``imagine demo``: the whole system on the embedded default, driven as a user would.

Prepares the Fashion-MNIST test images as a gallery, makes sure the default checkpoint exists
(training it with our trainer if it does not), starts ``imagine serve`` (Ray Serve app, index
owner, one Celery worker), ingests the gallery through the real job path (twice: the second run
skips every unchanged image), runs text queries over gRPC, writes a contact sheet of the hits
and prints category mAP and precision@10. It stops every process it started.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from imagine.config import load_service_settings
from imagine.data import FASHION_MNIST_CLASSES, class_query, export_gallery
from imagine.evaluation import CategoryReport, report_from_rankings
from imagine.sheets import contact_sheet

DEMO_QUERIES = (
    "a photo of a sneaker",
    "a pair of trousers",
    "an elegant dress",
    "a leather bag",
    "a warm winter coat",
    "summer sandals",
)


def fashion_queries() -> dict[str, str]:
    return {c: class_query(i) for i, c in enumerate(FASHION_MNIST_CLASSES)}


# Retrieval paths compared by `imagine eval`: name -> search options.
EVAL_PATHS: dict[str, dict[str, Any]] = {
    "text": {"mode": "text"},
    "generated (mean)": {"mode": "generated", "aggregation": "mean"},
    "generated (attention)": {"mode": "generated", "aggregation": "attention"},
    "fused": {"mode": "fused"},
}


def evaluate_over_grpc(
    client: Any,
    collection: str,
    queries: dict[str, str] | None = None,
    **search_options: Any,
) -> CategoryReport:
    """Category AP per query over the whole collection, from the service's own rankings."""
    queries = queries or fashion_queries()
    size = client.describe_collection(collection).points_count
    rankings: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    for label, text in queries.items():
        resp = client.search(
            text, collection=collection, top_k=max(1, min(size, 10_000)), **search_options
        )
        rankings[label] = [h.id for h in resp.hits]
        for h in resp.hits:
            fields = h.payload.fields
            labels[h.id] = fields["label"].string_value if "label" in fields else ""
    return report_from_rankings(rankings, labels)


def evaluate_paths(
    client: Any, collection: str, out_dir: Path, text_only: bool = False
) -> dict[str, CategoryReport]:
    """Every retrieval path the server offers: a table, ``eval.json``, ``eval.png`` and a
    contact sheet of generated images per class."""
    import grpc

    from imagine.reports import bar_chart, comparison_table, write_json

    reports: dict[str, CategoryReport] = {}
    not_run: dict[str, str] = {}  # path -> why the server cannot run it
    for name, options in EVAL_PATHS.items():
        if text_only and name != "text":
            break
        try:
            reports[name] = evaluate_over_grpc(client, collection, **options)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                raise
            not_run[name] = exc.details()  # type: ignore[attr-defined]
    print(comparison_table(reports))
    for why in dict.fromkeys(not_run.values()):  # one line per reason
        names = ", ".join(n for n, w in not_run.items() if w == why)
        print(f"    not run: {names}: {why}")
    json_path = write_json(reports, out_dir / "eval.json", collection=collection, not_run=not_run)
    chart = bar_chart(reports, out_dir / "eval.png", f"category retrieval, {collection}")
    print(f"    wrote {json_path} and {chart}")
    if len(reports) > 1:
        rows = []
        for label, text in fashion_queries().items():
            pngs, _ = client.generate(text, num_images=8)
            rows.append((text, [(Image.open(io.BytesIO(p)), label) for p in pngs]))
        sheet = contact_sheet(rows, out_dir / "generated_sheet.png")
        print(f"    generated images per class: {sheet}")
    return reports


def start_services(env: dict[str, str], log_path: Path, timeout_s: float = 600) -> Any:
    """``imagine serve`` in a child process; returns it once the ingress answers."""
    from imagine.client import ImagineClient

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagine.cli", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = env.get("IMAGINE_GRPC_ADDRESS", "127.0.0.1:50051")
    deadline = time.monotonic() + timeout_s
    with ImagineClient(address, timeout_s=10) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"imagine serve exited with {proc.returncode}; see {log_path}")
            try:
                c.list_collections()
                return proc
            except Exception:
                time.sleep(1.0)
    stop_services(proc)
    raise TimeoutError(f"services did not come up in {timeout_s:.0f}s; see {log_path}")


def stop_services(proc: Any, timeout_s: float = 120) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def ensure_checkpoint(model_spec: str) -> None:
    """Train the default model with our trainer if its checkpoint is missing."""
    if not model_spec.startswith("local-dir:"):
        return
    path = Path(model_spec.removeprefix("local-dir:"))
    if (path / "model.safetensors").is_file():
        return
    print(f"no checkpoint at {path}: training it now (Ray Train, a few minutes on 2 cores)")
    cmd = [sys.executable, "-m", "trainer", "--output", str(path), "--name", path.name]
    subprocess.run(cmd, check=True)


def _server_fuses(client: Any, collection: str) -> bool:
    import grpc

    try:
        client.search("probe", collection=collection, top_k=1, mode="fused")
        return True
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
            return False
        raise


def run_demo(limit: int | None = None, keep_running: bool = False) -> int:
    from imagine.cli import watch_with_progress
    from imagine.client import ImagineClient, state_name

    settings = load_service_settings()
    settings.ensure_dirs()
    out_dir = settings.data_dir / "demo"
    gallery = settings.data_dir / "galleries" / f"fashion-mnist-test-{limit or 10000}"
    print(f"1/6 gallery: exporting Fashion-MNIST test images to {gallery}")
    pairs = export_gallery(gallery, "test", limit)
    print(f"    {len(pairs)} images, 10 classes")
    print("2/6 model: checking the default checkpoint")
    ensure_checkpoint(settings.model)
    print("3/6 services: starting `imagine serve` (Ray Serve, gRPC ingress, Celery worker)")
    started = time.monotonic()
    proc = start_services(os.environ.copy(), out_dir / "serve.log")
    print(f"    up in {time.monotonic() - started:.0f}s on {settings.grpc_address}")
    try:
        with ImagineClient(settings.grpc_address, timeout_s=120) as c:
            _, version = c.encode_text(["probe"])
            collection = "fmnist-test-" + version.replace("+", "_")  # one per model version
            print(f"4/6 ingest: {gallery} -> collection {collection}")
            for attempt in ("first", "second"):
                job = c.create_ingest_job(str(gallery), collection)
                job = watch_with_progress(c, job.id)
                print(
                    f"    {attempt} run: job {job.id} {state_name(job.state)}: "
                    f"{job.embedded} embedded, {job.skipped} skipped (unchanged), "
                    f"{job.failed} failed; collection holds "
                    f"{c.describe_collection(collection).points_count} points"
                )
            fused = _server_fuses(c, collection)
            print("5/6 search: text queries over gRPC" + (", text-only | fused" if fused else ""))
            rows = []
            for text in DEMO_QUERIES:
                modes = ["text", "fused"] if fused else ["text"]
                results = {m: c.search(text, collection=collection, top_k=8, mode=m) for m in modes}
                print(f"    {text!r}")
                for rank in range(5):
                    cells = []
                    for m in modes:
                        h = results[m].hits[rank]
                        label = h.payload.fields["label"].string_value
                        cells.append(f"{h.score:.3f} {label:<11} {h.uri.rsplit('/', 1)[-1]}")
                    print(f"      {rank + 1}. " + "  |  ".join(cells))
                for m in modes:
                    hits = []
                    for h in results[m].hits:
                        key = h.payload.fields["key"].string_value
                        with Image.open(gallery / key) as img:
                            hits.append((img.copy(), h.payload.fields["label"].string_value))
                    rows.append((f"[{m}] {text}", hits))
            sheet = contact_sheet(rows, out_dir / "contact_sheet.png")
            print(f"    contact sheet: {sheet}")
            print("6/6 evaluation: one query per class over the whole gallery, per path")
            evaluate_paths(c, collection, out_dir)
        if keep_running:
            print(f"services left running (pid {proc.pid}); stop with: kill {proc.pid}")
            return 0
    finally:
        if not keep_running:
            print("stopping the services")
            stop_services(proc)
    return 0
