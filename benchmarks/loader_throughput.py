"""The training loader on a folder of JPEGs: images per CPU-second at 224×224 for each `aug`, against torchvision's
`ImageFolder` with timm's `create_transform(224, is_training=True)` on the same files; and JPEG draft decoding.

    .venv/bin/python benchmarks/loader_throughput.py [--files 2000] [--images 1024] [--workers 2] [--folder DIR]

1. Loader: the DataModule `pipeline.run.build_data` makes for training (`data=imagefolder`, batch 64, the given
   worker processes, not persistent) reads `--images` files per epoch, each batch collated and handed to the main
   process, as in training. Each measurement is a fresh process (`python -c`) running 3 epochs after a warm-up one;
   reported: images per second of wall time, and images per CPU-second — every image over the CPU time (user +
   system) of the main process and its loader workers together, the figure that says how many cores a GPU needs.
   What the batches then cost on the training device (uint8 → float, normalisation, channels-last) is not CPU work
   when training on a GPU, and is left out; it is timed on its own (`device step`, here on one CPU thread).
   torchvision + timm: the same files, `ImageFolder` and a plain DataLoader with the same batch and workers. Memory:
   the largest unique set size (USS: pages not shared with the main process) of a loader worker, read mid-epoch.
2. Draft: decoding large JPEGs (1600×1200 photos) in full against libjpeg's DCT scaling (`Image.draft`) as far as
   each pipeline allows (pipeline.data.transforms.draft_scale) — CPU time per image; for the deterministic resize, how
   far apart the two images the model sees are (mean difference, 0–255), next to how far apart two standard ways of
   resizing the fully decoded image are (bilinear and area): resampling noise.

The folder is generated like benchmarks/data_scale.py's (JPEGs of 300–500 px a side, about 40 KB each, 100 classes)
and kept. Run with PYTHONPATH pointing at another checkout to measure that code (the script uses only build_data,
load_image_folder, the config and, for the draft part, pipeline.data.decode). Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.data_scale import generate  # noqa: E402

MEASURE = """
import json, resource, sys, time, os
root, aug, workers, images, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 64
import torch
from torch.utils.data import DataLoader, Subset
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
if aug == "torchvision+timm":
    import timm.data
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(root, transform=timm.data.create_transform(224, is_training=True))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:images]
    def loader():
        return DataLoader(Subset(dataset, order.tolist()), batch_size=batch, shuffle=True, num_workers=workers)
else:
    from pipeline.config import compose
    from pipeline.data.folder import load_image_folder
    from pipeline.data.images import ImageSplits
    from pipeline.data.transforms import InputSpec
    from pipeline.run import build_data
    cfg = compose([f"aug={aug}", "data=imagefolder", f"data.root={root}", f"data.num_workers={workers}",
                   f"data.batch_size={batch}", "data.persistent_workers=false"])
    splits = load_image_folder(root, verify="off", val_fraction=0.1, test_fraction=0.1)
    part = splits.train
    from pipeline.data.images import ImageSubset
    import numpy as np
    pick = np.sort(np.random.default_rng(0).choice(len(part), images, replace=False))
    train = ImageSubset(part, pick, part.labels[pick])
    module = build_data(cfg, ImageSplits(train, train, train, splits.classes), InputSpec((224, 224), 3, MEAN, STD))
    loader = module.train_dataloader
def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
for _ in loader():  # warm-up: page cache, lazy imports
    pass
def worker_memory():  # each loader worker's own memory (USS: not the pages it shares with the main process), MiB
    import psutil
    sizes = []
    for child in psutil.Process().children():
        try:
            sizes.append(child.memory_full_info().uss / 2**20)
        except psutil.Error:
            pass
    return sizes
rates, memory = [], []
for _ in range(3):
    started, used, seen = time.perf_counter(), cpu(), 0
    for step, (batch_images, labels) in enumerate(loader()):
        seen += len(batch_images)
        if step == 4:
            memory += worker_memory()
    wall, spent = time.perf_counter() - started, cpu() - used
    rates.append((seen / wall, seen / spent, str(batch_images.dtype)))
device = None
if batch_images.dtype == torch.uint8:  # what the training device then does with each batch, here on one CPU thread
    from pipeline.data.normalize import Normalize
    normalize = Normalize(MEAN, STD, channels_last=True)
    torch.set_num_threads(1)
    started = time.process_time()
    for _ in range(20):
        normalize(batch_images)
    device = (time.process_time() - started) / 20 * 1000
print(json.dumps({"wall": max(r[0] for r in rates), "cpu": max(r[1] for r in rates), "dtype": rates[0][2],
                  "device_ms": device, "worker_mb": max(memory) if memory else None}))
"""


def measure(folder: Path, aug: str, workers: int, images: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), aug, str(workers), str(images)],
        cwd=tempfile.gettempdir(),  # not a checkout: PYTHONPATH alone says which code is measured
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), **os.environ},
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def photo(width: int, height: int, seed: int) -> bytes:
    """A large JPEG like a photo: smooth colour fields, edges and fine grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 10, (height, width, 3))
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 30, 40)  # a sharp-edged block
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def draft_rows(count: int = 30) -> list[str]:
    import albumentations as A
    import cv2

    from pipeline.config import compose
    from pipeline.data.decode import decode_image
    from pipeline.data.transforms import InputSpec, draft_scale, eval_transform, train_transform

    cv2.setNumThreads(1)
    spec = InputSpec((224, 224), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    files = [photo(1600, 1200, seed) for seed in range(count)]
    rows = []
    for label, transform in (
        ("`aug=none` (resize to 224×224)", eval_transform(spec)),  # the same steps as aug=none's
        ("`aug=light` (crops of ≥ 70% of the area)", train_transform(compose(["aug=light"]).aug.train, spec, 0)),
        ("`aug=heavy` (crops of ≥ 35% of the area)", train_transform(compose(["aug=heavy"]).aug.train, spec, 0)),
    ):
        scale, seconds, differences, noise = draft_scale(transform), {"full": 0.0, "draft": 0.0}, [], []
        for data in files:
            started = time.process_time()
            full = decode_image(io.BytesIO(data), 3)
            seconds["full"] += time.process_time() - started
            started = time.process_time()
            drafted = decode_image(io.BytesIO(data), 3, scale)
            seconds["draft"] += time.process_time() - started
            if isinstance(transform.transforms[0], A.Resize):  # deterministic: the model's view both ways, and noise
                seen = [transform(image=image)["image"].numpy().astype(np.int16) for image in (full, drafted)]
                differences.append(np.abs(seen[0] - seen[1]).mean())
                linear, area = (cv2.resize(full, (224, 224), interpolation=i).astype(np.int16) for i in (1, 3))
                noise.append(np.abs(linear - area).mean())
        shown = f"{np.mean(differences):.2f} ({np.mean(noise):.2f})" if differences else "–"
        rows.append(
            f"| {label} | {drafted.shape[1]}×{drafted.shape[0]} | {seconds['full'] / count * 1000:.1f} | "
            f"{seconds['draft'] / count * 1000:.1f} | {seconds['full'] / seconds['draft']:.1f}× | {shown} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--images", type=int, default=1024, help="images read per epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None, help="where the images are generated (kept)")
    parser.add_argument("--augs", default="none,light,heavy,torchvision+timm")
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-decoding comparison")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.gettempdir()) / f"data_scale_{args.files}"
    mean_size = generate(folder, args.files, 100)
    print(
        f"{args.files:,} JPEGs, {mean_size / 1024:.0f} KB on average, in {folder}; {len(os.sched_getaffinity(0))} "
        f"CPUs; {args.images} images an epoch, batch 64, num_workers={args.workers}\n"
    )
    print(
        "| loader, 224×224 | images/s | images per CPU-second | batch dtype | device step ms/batch | "
        "memory of a worker (USS) MiB |"
    )
    print("|---|---:|---:|---|---:|---:|")
    for aug in args.augs.split(","):
        result = measure(folder, aug, args.workers, args.images)
        label = f"`aug={aug}`" if aug != "torchvision+timm" else "torchvision `ImageFolder` + timm `create_transform`"
        device = f"{result['device_ms']:.1f}" if result.get("device_ms") is not None else "–"
        memory = f"{result['worker_mb']:.0f}" if result.get("worker_mb") is not None else "–"
        row = f"| {label} | {result['wall']:.0f} | {result['cpu']:.0f} | {result['dtype']} | {device} | {memory} |"
        print(row, flush=True)
    if not args.no_draft:
        print(
            "\n| 1600×1200 JPEG, 224×224 input | decoded at | full decode CPU ms | draft decode CPU ms | speed-up | "
            "mean difference seen by the model, 0–255 (bilinear vs area resize of the full image) |"
        )
        print("|---|---|---:|---:|---:|---|")
        for line in draft_rows():
            print(line, flush=True)


if __name__ == "__main__":
    main()
