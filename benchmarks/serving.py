"""Serving latency and throughput of a logged model behind MLflow's real scoring server, over HTTP.

    .venv/bin/python benchmarks/serving.py [--case lenet5] [--case resnet18] [--requests 200] [--batches 30]

For each case a model is trained briefly on the digits (its accuracy does not matter here; its cost does) and its
MLflow model is served from the run's output folder with `mlflow models serve --env-manager local` on a free
loopback port, one worker, from this virtualenv. A `requests` session (keep-alive, as a real client would) posts the
documented payload (`dataframe_split` with a base64 PNG per row; 32×32 grayscale digits):
- latency: one image per request, `--requests` requests one after another after 10 warm-up ones; p50 and p95;
- throughput: 32 images per request, `--batches` requests one after another; images per second.
The server is stopped by its PID (its process group). Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import compose
from pipeline.run import run

CASES = {  # train overrides: a short run is enough to have a model of the right size
    "lenet5": ["model=lenet5", "trainer.max_epochs=1"],
    "resnet18": [  # torchvision's ResNet-18 layout at its 224×224 input: the digits are resized to it
        "model=classic_resnet18",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ],
}


def train(root: str, overrides: Sequence[str]) -> Path:
    cfg = compose(
        [
            f"paths.root={root}",
            f"paths.output_dir={root}/out",
            "progress=none",
            "trainer.enable_model_summary=false",
            "scheduler.warmup_epochs=0",
            "logger.system_metrics.enabled=false",
            *overrides,
        ]
    )
    return run(cfg).output_dir / "model"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(model: Path, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port, bin_dir = free_port(), Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return url, server
        except requests.RequestException:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def digit_pngs(count: int) -> list[str]:
    digits = load_digits()
    encoded = []
    for index in range(count):
        pixels = (digits.images[index % len(digits.images)] * 16).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((32, 32)).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return encoded


def payload(images: Sequence[str]) -> dict[str, object]:
    return {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}


def measure(url: str, requests_count: int, batches: int) -> dict[str, float]:
    session = requests.Session()
    images = digit_pngs(32 * 4)

    def post(rows: Sequence[str]) -> float:
        start = time.perf_counter()
        answer = session.post(f"{url}/invocations", json=payload(rows), timeout=120)
        elapsed = time.perf_counter() - start
        answer.raise_for_status()
        assert len(answer.json()["predictions"]) == len(rows)
        return elapsed

    for index in range(10):
        post(images[index : index + 1])
    single = sorted(post(images[index % len(images) : index % len(images) + 1]) for index in range(requests_count))
    start = time.perf_counter()
    for index in range(batches):
        post(images[(index % 4) * 32 : (index % 4 + 1) * 32])
    seconds = time.perf_counter() - start
    return {
        "p50_ms": statistics.median(single) * 1000,
        "p95_ms": single[int(0.95 * (len(single) - 1))] * 1000,
        "images_per_s": 32 * batches / seconds,
        "batch_ms": seconds / batches * 1000,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args(argv)

    rows = []
    for case in args.case or list(CASES):
        with tempfile.TemporaryDirectory() as root:
            model = train(root, CASES[case])
            url, server = serve(model, Path(root) / "serve.log")
            try:
                rows.append((case, measure(url, args.requests, args.batches)))
            finally:
                stop(server)
    print("| model | 1 image: p50 (ms) | 1 image: p95 (ms) | 32 images: ms per request | 32 images: images/s |")
    print("|---|---:|---:|---:|---:|")
    for case, figures in rows:
        print(
            f"| {case} | {figures['p50_ms']:.1f} | {figures['p95_ms']:.1f} | {figures['batch_ms']:.0f} | "
            f"{figures['images_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
