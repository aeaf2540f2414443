"""The ``imagine`` command line. Client commands talk gRPC and import no model code.

imagine serve                      # embedded profile: Ray Serve app, index owner, one worker
imagine ingest DIR --collection C  # progress bar until the job ends, then the counts
imagine search "a red dress" --collection C --k 5
imagine search --image shoe.png --collection TEXTS   # image -> text (or -> image)
imagine ingest captions.jsonl --texts --collection TEXTS
imagine caption shoe.png --strategy beam
imagine demo                       # the whole thing on Fashion-MNIST
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from imagine.config import load_client_settings


def _client(args: argparse.Namespace) -> Any:
    from imagine.client import ImagineClient

    cfg = load_client_settings()
    return ImagineClient(
        args.address or cfg.grpc_address,
        timeout_s=args.timeout,
        api_key=args.api_key or cfg.api_key,
        ca_file=args.ca_file or cfg.ca_file,
        server_name=args.server_name,
    )


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# -- serve / worker / train ---------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Start the embedded profile and block until Ctrl-C / SIGTERM, then stop everything."""
    from imagine.config import load_service_settings
    from imagine.runtime import setup_logging

    settings = load_service_settings()
    setup_logging(settings.log_level, settings.log_format)
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    def install_handlers() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    install_handlers()
    from services.app import init_ray, run_app, stop

    worker: subprocess.Popen[bytes] | None = None
    try:
        init_ray(settings)
        # Ray's driver installs its own SIGTERM handlers; ours win before the application starts
        # (a SIGTERM while it started used to exit through Ray's, with 15 or SIGABRT). A signal
        # during the start-up stops the services once they are up.
        install_handlers()
        if stopping:
            return 0
        print("imagine: Ray is up; starting the services", flush=True)
        info = run_app(settings)
        if stopping:
            return 0
        if not args.no_worker:
            worker = subprocess.Popen([sys.executable, "-m", "workers"], env=os.environ.copy())
        print(
            f"imagine: serving {info['model_version']} on {info['address']} "
            f"(data in {settings.data_dir}); Ctrl-C stops",
            flush=True,
        )
        while not stopping:
            if worker is not None and worker.poll() is not None:
                print("imagine: the worker exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        print("imagine: stopping", flush=True)
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: finish the current tasks
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        stop()


# Commands whose arguments go, unparsed, to a parser of their own (argparse's REMAINDER would
# reject them: ``imagine train --stage generator`` gave "unrecognized arguments").
def _worker_main(argv: list[str]) -> int:
    from workers.__main__ import main as worker_main

    return worker_main(argv)


def _train_main(argv: list[str]) -> int:
    from trainer.main import main as train_main

    return train_main(argv)


PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {
    "worker": _worker_main,
    "train": _train_main,
}


# -- client commands --------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    from imagine.client import state_name

    source = args.source
    if "://" not in source:
        source = str(Path(source).expanduser().resolve())
    with _client(args) as c:
        job = c.create_ingest_job(
            source,
            args.collection,
            _kv(args.meta),
            args.chunk_size,
            sync=args.sync,
            kind="texts" if args.texts else "images",
        )
        print(f"job {job.id} queued: {source} -> {args.collection}")
        if args.no_wait:
            return 0
        job = watch_with_progress(c, job.id)
    removed = f", {job.removed} removed (gone)" if job.sync else ""
    print(
        f"job {job.id} {state_name(job.state)}: {job.embedded} embedded, "
        f"{job.skipped} skipped (unchanged), {job.failed} failed of {job.total}{removed}; "
        f"{job.objects_per_second:,.0f} objects/s"
    )
    for f in job.failures[:20]:
        print(f"  failed: {f.uri}: {f.reason}")
    if job.failed > 20:
        print(f"  ... every failure: imagine jobs --id {job.id}")
    if job.error:
        print(f"  error: {job.error}")
    return 0 if state_name(job.state).startswith("SUCCEEDED") else 1


def watch_with_progress(client: Any, job_id: str) -> Any:
    from tqdm import tqdm

    from imagine.client import TERMINAL_STATES, state_name

    bar = tqdm(total=0, unit="img", desc="ingest", dynamic_ncols=True)
    job = client.get_job(job_id)
    try:
        for job in client.watch_job(job_id):
            done = job.embedded + job.skipped + job.failed
            if job.total != bar.total:
                bar.total = job.total
            bar.update(done - bar.n)
            bar.set_postfix_str(
                f"{state_name(job.state).lower()} e={job.embedded} s={job.skipped} f={job.failed}"
            )
            if job.state in TERMINAL_STATES:
                break
    finally:
        bar.close()
    return job


def cmd_jobs(args: argparse.Namespace) -> int:
    from imagine.client import state_name

    with _client(args) as c:
        if args.cancel:
            job = c.cancel_job(args.cancel)
            print(f"job {job.id}: {state_name(job.state)}")
            return 0
        jobs = [c.get_job(args.id)] if args.id else c.list_jobs(args.collection, args.limit)
    print(
        f"{'id':<16}  {'collection':<16}  {'state':<21}  {'total':>7}  {'embedded':>8}  "
        f"{'skipped':>7}  {'failed':>6}"
    )
    for j in jobs:
        print(
            f"{j.id:<16}  {j.collection[:16]:<16}  {state_name(j.state):<21}  {j.total:>7}  "
            f"{j.embedded:>8}  {j.skipped:>7}  {j.failed:>6}"
        )
        if args.id:
            print(
                f"  {j.objects_per_second:,.1f} objects/s"
                + (f", removed {j.removed}" if j.sync else "")
            )
            with _client(args) as c:
                for f in c.job_failures(j.id):
                    print(f"  failed: {f.uri}: {f.reason}")
            if j.error:
                print(f"  error: {j.error}")
    return 0


def _read_image(path: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SystemExit(f"error: image file {p} not found")
    return p.read_bytes()


def cmd_caption(args: argparse.Namespace) -> int:
    images = [_read_image(p) for p in args.images]
    with _client(args) as c:
        caps, version = c.caption(images, args.strategy, args.beam, args.temperature, args.seed)
    print(f"caption decoder {version}")
    failed = 0
    for path, cap in zip(args.images, caps, strict=True):
        if cap.error:
            failed += 1
            print(f"{path}: error: {cap.error}")
        else:
            print(f"{path}: {cap.text}  (log p = {cap.log_prob:.3f})")
    return 1 if failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    if (args.text is None) == (args.image is None):
        return _fail("give a query text or --image PATH (not both)")
    image = _read_image(args.image) if args.image else None
    with _client(args) as c:
        resp = c.search(
            args.text,
            image=image,
            weights=_weights(args.weight),
            collection=args.collection,
            top_k=args.k,
            filters=_kv(args.filter),
            mode=args.mode,
            aggregation=args.aggregation,
            num_generated=args.generated,
            steps=args.steps,
            seed=args.seed,
        )
    if args.json:
        print(json_format.MessageToJson(resp))
        return 0
    weights = ", ".join(f"{p} {w:.2f}" for p, w in sorted(resp.weights.items()))
    print(f"{len(resp.hits)} hits (model {resp.model_version}; weights {weights})")
    if resp.query_caption:
        print(f"query caption: {resp.query_caption}")
    for rank, h in enumerate(resp.hits, 1):
        fields = h.payload.fields
        label = fields["label"].string_value if "label" in fields else ""
        paths = " ".join(f"{p}={s:.3f}" for p, s in sorted(h.path_scores.items()))
        print(f"{rank:>3}. {h.score:.4f}  {label:<12}  {h.uri}  [{paths}]")
        for name in ("text", "caption"):
            if name in fields and fields[name].string_value:
                print(f"       {name}: {fields[name].string_value}")
    return 0


def _weights(pairs: list[str] | None) -> dict[str, float]:
    out = {}
    for path, value in _kv(pairs).items():
        try:
            out[path] = float(value)
        except ValueError:
            raise SystemExit(f"error: weight of {path!r} must be a number, got {value!r}") from None
    return out


def cmd_collections(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.delete:
            c.delete_collection(args.delete)
            print(f"deleted {args.delete}")
            return 0
        if args.alias:
            alias, sep, target = args.alias.partition("=")
            if not sep or not alias or not target:
                raise SystemExit("--alias takes ALIAS=COLLECTION")
            c.set_alias(alias, target)
            print(f"{alias} -> {target}")
            return 0
        if args.delete_alias:
            c.delete_alias(args.delete_alias)
            print(f"deleted alias {args.delete_alias}")
            return 0
        for col in c.list_collections():
            vecs = ", ".join(f"{v.name}[{v.size}]" for v in col.vectors)
            aliases = f"  (aliases: {', '.join(col.aliases)})" if col.aliases else ""
            print(
                f"{col.name:<24} {col.points_count:>8} points  {col.model_version}  {vecs}{aliases}"
            )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from imagine.demo import evaluate_paths

    with _client(args) as c:
        evaluate_paths(c, args.collection, Path(args.out), text_only=args.text_only)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imagine.demo import run_demo

    return run_demo(limit=args.limit, keep_running=args.keep_running)


def cmd_keys(args: argparse.Namespace) -> int:
    """Print a new random API key and the entry of IMAGINE_AUTH__KEYS that admits it."""
    import json
    import secrets

    from imagine.config import hash_api_key

    key = "imk_" + secrets.token_urlsafe(32)
    entry = {"name": args.name, "role": args.role, "sha256": hash_api_key(key)}
    print(f"API key (shown once; give it to the client as IMAGINE_API_KEY): {key}")
    print(f"server entry (add to the IMAGINE_AUTH__KEYS JSON list): {json.dumps(entry)}")
    return 0


def _kv(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagine", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="gRPC address (default IMAGINE_GRPC_ADDRESS, 127.0.0.1:50051)")
    p.add_argument("--api-key", help="API key (default IMAGINE_API_KEY)")
    p.add_argument("--ca-file", help="PEM CA certificate: connect with TLS (IMAGINE_CA_FILE)")
    p.add_argument("--server-name", help="TLS: the name the server's certificate holds")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per call, s (60)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the embedded profile until Ctrl-C")
    s.add_argument("--no-worker", action="store_true", help="do not start a Celery worker")
    s.set_defaults(fn=cmd_serve)

    # listed here for --help; main() hands their arguments to their own parsers (PASSTHROUGH)
    sub.add_parser("worker", help="run a Celery ingestion worker (cluster profile; celery options)")

    sub.add_parser("train", help="train a model with Ray Train (see `imagine train --help`)")

    s = sub.add_parser("ingest", help="ingest a folder or s3://bucket/prefix into a collection")
    s.add_argument("source")
    s.add_argument("--collection", required=True)
    s.add_argument("--meta", action="append", metavar="KEY=VALUE", help="payload for every point")
    s.add_argument("--chunk-size", type=int, default=0)
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--sync", action="store_true", help="also remove points whose objects are gone")
    s.add_argument(
        "--texts",
        action="store_true",
        help="a text gallery: .txt objects, .jsonl objects or a .jsonl file (text, id, label)",
    )
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("jobs", help="list ingestion jobs, show one, or cancel one")
    s.add_argument("--collection", default="")
    s.add_argument("--id", help="show one job with every failure")
    s.add_argument("--cancel", metavar="ID", help="cancel a job")
    s.add_argument("--limit", type=int, default=20)
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("search", help="text -> image, or image -> text/image (--image) search")
    s.add_argument("text", nargs="?", default=None)
    s.add_argument("--image", metavar="PATH", help="an image query (over a text or image gallery)")
    s.add_argument("--collection", required=True)
    s.add_argument(
        "--weight", action="append", metavar="PATH=W", help="path weight, e.g. caption=0.3"
    )
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--filter", action="append", metavar="KEY=VALUE")
    s.add_argument(
        "--mode", default="", choices=["", "text", "generated", "fused"], help="default: fused"
    )
    s.add_argument(
        "--aggregation",
        default="",
        choices=["", "attention", "mean"],
        help="default: the served aggregator's own; attention needs an attention aggregator",
    )
    s.add_argument("--generated", type=int, default=0, help="K generated images (0: default)")
    s.add_argument("--steps", type=int, default=0, help="denoising steps (0: default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_search)

    s = sub.add_parser("caption", help="caption images with the caption decoder")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--strategy", default="", choices=["", "greedy", "beam", "sample"])
    s.add_argument("--beam", type=int, default=0, help="beam size (0: 4)")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling (0: 1.0)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_caption)

    s = sub.add_parser("collections", help="list collections and aliases, delete, switch aliases")
    s.add_argument("--delete", metavar="NAME")
    s.add_argument("--alias", metavar="ALIAS=COLLECTION", help="point an alias at a collection")
    s.add_argument("--delete-alias", metavar="ALIAS")
    s.set_defaults(fn=cmd_collections)

    s = sub.add_parser("eval", help="category mAP and P@10 of a labelled collection over gRPC")
    s.add_argument("--collection", required=True)
    s.add_argument("--out", default="eval", help="folder for eval.json, the chart and sheets")
    s.add_argument("--text-only", action="store_true", help="only the text-image path")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("keys", help="make an API key: `imagine keys new --role reader`")
    s.add_argument("action", choices=["new"])
    s.add_argument("--role", choices=["reader", "writer", "admin"], default="reader")
    s.add_argument("--name", default="client", help="the key's name in logs")
    s.set_defaults(fn=cmd_keys)

    s = sub.add_parser("demo", help="ingest Fashion-MNIST, search it, evaluate (embedded profile)")
    s.add_argument("--limit", type=int, default=None, help="gallery size (default 10000)")
    s.add_argument("--keep-running", action="store_true", help="leave the services up")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASSTHROUGH:
        return int(PASSTHROUGH[argv[0]](argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except grpc.RpcError as exc:
        return _fail(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
