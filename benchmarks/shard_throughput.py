"""Reading WebDataset shards (data=shards) from a local S3 API server and from a folder: images per second and per
CPU-second, for the bytes alone, decoded, and through the training loader at 224×224.

    .venv/bin/python benchmarks/shard_throughput.py [--files 5000] [--classes 50] [--folder DIR] [--workers 1]

The image folder is generated first by benchmarks/data_scale.py's generator (JPEGs of 300–500 px a side, ~40 KB;
kept and reused in --folder), converted once with `pipeline.data.shard_writer` (as `python -m pipeline.shard` does)
into a bucket of moto's S3 server on 127.0.0.1 and into a local folder, then read back:
- bytes: every training sample's encoded bytes, one ranged GET per shard (`ShardSet.encoded`), nothing decoded;
- decoded: the same, each image decoded to a uint8 array (`ShardSet.decode`, as training does);
- loader: the training loader (`ShardLoader` over `ShardStream`, shard and block shuffling) with the evaluation
  transform at 224×224 (resize, normalize, tensor), `--workers` loader processes and with none.
CPU seconds are this process's and its loader workers' (user + system), and separately the S3 server's: moto is a
Python server (Flask, one request at a time per connection), so the server side is moto's cost, not what a real
object store would charge a client. Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from data_scale import generate  # noqa: E402  (the same generated folder as the start-up benchmark)

from pipeline.data.folder import load_image_folder  # noqa: E402
from pipeline.data.shard_store import Store  # noqa: E402
from pipeline.data.shard_stream import ShardLoader, ShardStream  # noqa: E402
from pipeline.data.shard_writer import write_shards  # noqa: E402
from pipeline.data.shards import ShardSet, load_shards  # noqa: E402
from pipeline.data.transforms import InputSpec, eval_transform  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(work: Callable[[], int], server: psutil.Process | None) -> dict[str, float]:
    served = sum(server.cpu_times()[:2]) if server else 0.0
    started, cpu = time.perf_counter(), cpu_seconds()
    images = work()
    wall, used = time.perf_counter() - started, cpu_seconds() - cpu
    return {
        "images": images,
        "wall": wall,
        "cpu": used,
        "server": (sum(server.cpu_times()[:2]) - served) if server else 0.0,
    }


def read_bytes(shards: ShardSet) -> int:
    return sum(
        1 for number in range(len(shards.shards)) for _ in shards.encoded(number, 0, shards.shards[number].samples)
    )


def read_decoded(shards: ShardSet) -> int:
    count = 0
    for number, info in enumerate(shards.shards):
        for data, _ in shards.encoded(number, 0, info.samples):
            shards.decode(data, info.name)
            count += 1
    return count


def read_loader(shards: ShardSet, workers: int) -> int:
    spec = InputSpec(size=(224, 224), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    stream = ShardStream(shards, eval_transform(spec), 64, train=True, seed=0, rank=0, world=1, drop_last=False)
    return sum(len(labels) for _, labels in ShardLoader(stream, lambda: (0, 0), num_workers=workers))


def row(label: str, result: dict[str, float], server: bool) -> str:
    rate, per_cpu = result["images"] / result["wall"], result["images"] / max(result["cpu"], 1e-9)
    served = f"{result['server']:.1f}" if server else "–"
    figures = f"{result['images']:,.0f} | {result['wall']:.2f} | {rate:,.0f} | {result['cpu']:.1f} | {per_cpu:,.0f}"
    return f"| {label} | {figures} | {served} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "shard_throughput_images")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shard-samples", type=int, default=1000)
    args = parser.parse_args()

    existing = sum(1 for _ in args.folder.rglob("*.jpg")) if args.folder.exists() else 0
    if existing != args.files:
        generate(args.folder, args.files, args.classes)
    splits = load_image_folder(args.folder, verify="off", val_fraction=0.05, test_fraction=0.05)

    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(CREDENTIALS)
    local = Path(tempfile.mkdtemp(prefix="shards-"))  # the local copy, removed at the end
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        stores = {"S3 (moto, loopback)": Store("s3://bench/shards", endpoint), "local folder": Store(str(local))}
        watched = psutil.Process(server.pid)
        lines = []
        for name, store in stores.items():

            def convert(store: Store = store) -> int:
                index = write_shards(splits, store, args.shard_samples, 10**9, 0, {})
                return sum(info.samples for shards in index.splits.values() for info in shards)

            wrote = timed(convert, watched if store.is_s3 else None)
            shards = load_shards(store.url, endpoint_url=store.endpoint_url).train
            assert isinstance(shards, ShardSet)
            on_s3 = store.is_s3
            lines.append(row(f"{name}: convert (read files, write shards{', upload' if on_s3 else ''})", wrote, on_s3))
            for label, work in [
                ("bytes", lambda s=shards: read_bytes(s)),
                ("decoded", lambda s=shards: read_decoded(s)),
                ("loader, 224×224, no workers", lambda s=shards: read_loader(s, 0)),
                (f"loader, 224×224, {args.workers} worker(s)", lambda s=shards: read_loader(s, args.workers)),
            ]:
                lines.append(row(f"{name}: {label}", timed(work, watched if on_s3 else None), on_s3))
        size = sum(info.bytes for info in shards.shards) / 1e6
        print(
            f"{len(splits.train):,} training images in {len(shards.shards)} shards ({size:.0f} MB), "
            f"{os.cpu_count()} CPUs\n"
        )
        print("| read | images | wall s | images/s | CPU s | images/CPU-s | server CPU s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(lines))
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(local, ignore_errors=True)


if __name__ == "__main__":
    main()
