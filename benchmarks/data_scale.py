"""Start-up on a large image folder: the time to list, check and split it (`load_image_folder`), first with an empty
cache of verified files and then again, for each `data.verify` mode; and the run's dataset digest (the MD5 of every
file's bytes, remembered in the same cache), first and second time.

    .venv/bin/python benchmarks/data_scale.py [--files 100000] [--classes 100] [--folder DIR]

The folder is generated first (once: it is kept and reused when it holds the files asked for): JPEGs of 300–500 px a
side, smooth colour fields with grain, about 40 KB each, spread evenly over the classes. Each measurement is a fresh
process (`python -c`), so nothing is shared in memory between the first and the second start; the page cache is
warm (the files were just written or read). Reported per row: wall time, the CPU time of the load (user + system
of every thread: how many cores the scan kept busy), the process's peak resident memory (imports included, about
200 MiB), and how many files were checked or taken from the cache.
Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MEASURE = """
import json, resource, sys, time
from pipeline.data.folder import load_image_folder
root, verify, cache, digest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
import pipeline.data.scan as scan
found = {}
original = scan.scan_images
def counted(*args, **kwargs):
    result = original(*args, **kwargs)
    found.update(checked=result.checked, remembered=result.remembered)
    return result
import pipeline.data.folder as folder
folder.scan_images = counted
started, cpu = time.perf_counter(), time.process_time()
splits = load_image_folder(root, verify=verify, cache_dir=None if cache == "-" else cache)
loaded, load_cpu = time.perf_counter() - started, time.process_time() - cpu
digest_s = digest_read = None
if digest:
    from pipeline.data.contents import FileHashes
    from pipeline.tracking.datasets import digest as fingerprint
    started = time.perf_counter()
    with FileHashes(None if cache == "-" else cache) as hashes:
        for part in (splits.train, splits.val, splits.test):
            fingerprint(part, splits.classes, hashes)
    digest_s, digest_read = time.perf_counter() - started, hashes.read
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": loaded, "cpu": load_cpu, "rss_mb": usage.ru_maxrss / 1024,
                  "digest_s": digest_s, "digest_read": digest_read, **found}))
"""


def photo(arguments: tuple[Path, int]) -> int:
    """One JPEG: a smooth random colour field (upsampled from a few pixels) with fine grain, 300–500 px a side."""
    path, seed = arguments
    rng = np.random.default_rng(seed)
    height, width = (int(side) for side in rng.integers(300, 501, 2))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 14, (height, width, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=85)
    return path.stat().st_size


def generate(folder: Path, files: int, classes: int) -> float:
    """The folder of `files` JPEGs in `classes` class folders; kept for the next run. Returns the mean file size."""
    marker = folder / ".generated.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"files": files, "classes": classes}:
        sizes = [entry.stat().st_size for entry in folder.glob("*/*.jpg")]
        return sum(sizes) / len(sizes)
    shutil.rmtree(folder, ignore_errors=True)
    jobs = []
    for index in range(files):
        name = f"class_{index % classes:03d}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        jobs.append((folder / name / f"{index:07d}.jpg", index))
    with Pool(len(os.sched_getaffinity(0))) as pool:
        sizes = pool.map(photo, jobs, chunksize=256)
    marker.write_text(json.dumps({"files": files, "classes": classes}))
    return sum(sizes) / len(sizes)


def measure(folder: Path, verify: str, cache: str, digest: bool = False) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), verify, cache, "1" if digest else "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(label: str, result: dict[str, float]) -> str:
    checked = f"{result.get('checked', 0):,} / {result.get('remembered', 0):,}"
    return f"| {label} | {result['seconds']:.2f} | {result['cpu']:.1f} | {result['rss_mb']:.0f} | {checked} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--folder", type=Path, default=None, help="where the images are generated (kept)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.gettempdir()) / f"data_scale_{args.files}"
    mean_size = generate(folder, args.files, args.classes)
    print(
        f"{args.files:,} JPEGs in {args.classes} classes, {mean_size / 1024:.0f} KB on average, in {folder}; "
        f"{len(os.sched_getaffinity(0))} CPUs\n"
    )
    print("| start | wall s | CPU s | peak RSS MiB | files checked / remembered |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        print(row("`data.verify=off` (listing and split only)", measure(folder, "off", "-")))
        for verify in ("full", "header"):
            cache = str(Path(scratch) / verify)
            print(row(f"`data.verify={verify}`, first run (empty cache)", measure(folder, verify, cache)))
            print(row(f"`data.verify={verify}`, second run", measure(folder, verify, cache)))
        print(row("`data.verify=full`, `data.cache_dir=null` (as before)", measure(folder, "full", "-")))
        digests = [measure(folder, "full", str(Path(scratch) / "full"), digest=True) for _ in ("first", "second")]
    print("\n| the run's MLflow dataset digests of the three splits | wall s | files read |\n|---|---:|---:|")
    for label, digest in zip(("first run (hashes every file)", "second run"), digests, strict=True):
        print(f"| {label} | {digest['digest_s']:.2f} | {digest['digest_read']:,} |")


if __name__ == "__main__":
    main()
