"""Each image file is checked once: what a check found is remembered by path, size and modification time, so a second
scan opens nothing, a changed or added file is checked again, and every data.verify mode refuses what its README row
says; the first scan holds a bounded number of files in flight."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.folder import load_image_folder
from pipeline.data.scan import IN_FLIGHT_PER_THREAD, Scan, bounded_map, scan_images
from pipeline.data.verified import DATABASE

PER_CLASS = 6
SIDE = 48


def write_photos(root: Path) -> list[Path]:
    """Real JPEG and PNG files of noise in three class folders, listed in a fixed order."""
    rng = np.random.default_rng(0)
    paths = []
    for name in ("cat", "dog", "fox"):
        (root / name).mkdir(parents=True)
        for index in range(PER_CLASS):
            path = root / name / f"{index:02d}.{'jpg' if index % 2 else 'png'}"
            Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def scan(paths: list[Path], cache: Path | None, verify: str = "full", min_size: int = 8) -> Scan:
    return scan_images(paths, min_size=min_size, verify=verify, cache_dir=cache)


def rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """Replace the file's bytes with as many others and put its modification time back: to the cache it is the file
    it checked before."""
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_second_scan_opens_no_file(tmp_path: Path) -> None:
    paths, cache = write_photos(tmp_path / "images"), tmp_path / "cache"
    first = scan(paths, cache)
    assert (first.checked, first.remembered, len(first.usable)) == (len(paths), 0, len(paths))
    assert (cache / DATABASE).is_file()
    # The proof that nothing is read again: a file garbled behind the cache's back, same size and time, still passes.
    garbled = paths[1]
    rewrite_keeping_stat(garbled, b"\0" * garbled.stat().st_size)
    second = scan(paths, cache)
    assert (second.checked, second.remembered) == (0, len(paths))
    assert second.usable == paths and not second.bad
    assert scan(paths, None).bad[0][0] == garbled, "without the cache the garbled file is found"


def test_a_changed_touched_or_added_file_is_checked_again(tmp_path: Path) -> None:
    root, cache = tmp_path / "images", tmp_path / "cache"
    paths = write_photos(root)
    scan(paths, cache)
    truncated = paths[3]  # a JPEG
    truncated.write_bytes(truncated.read_bytes()[:-400])
    touched = paths[4]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000_000))
    added = root / "cat" / "new.png"
    Image.new("RGB", (SIDE, SIDE), "white").save(added)
    again = scan([*paths, added], cache)
    assert (again.checked, again.remembered) == (3, len(paths) - 2)
    assert [path for path, _ in again.bad] == [truncated]
    assert added in again.usable and touched in again.usable
    assert scan([*paths, added], cache).checked == 0, "and then remembered"


def corrupt_files(folder: Path) -> dict[str, Path]:
    """One file of each kind the modes tell apart."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {}
    for kind, fmt in (("jpeg", "JPEG"), ("png", "PNG")):
        path = folder / f"whole.{kind}"
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path, fmt)
        cut = folder / f"truncated.{kind}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        files[f"truncated {kind}"] = cut
    files["not an image"] = folder / "notes.jpg"
    files["not an image"].write_text("not a picture\n")
    return files


# What each mode refuses, as the README's data.verify row says.
REFUSED = {
    "full": {"truncated jpeg", "truncated png", "not an image"},
    "header": {"truncated png", "not an image"},  # a JPEG cut short passes a header check
    "off": set(),
}


@pytest.mark.parametrize("verify", sorted(REFUSED))
def test_each_verify_mode_refuses_what_it_promises_from_the_cache_too(tmp_path: Path, verify: str) -> None:
    files, cache = corrupt_files(tmp_path / "files"), tmp_path / "cache"
    names = {path: name for name, path in files.items()}
    for attempt in ("first", "remembered"):
        result = scan(list(files.values()), cache, verify=verify)
        assert {names[path] for path, _ in result.bad} == REFUSED[verify], attempt
        assert all("corrupt or truncated" in why or "not an image" in why for _, why in result.bad)
    assert result.checked == 0 and result.remembered == (0 if verify == "off" else len(files))


def test_a_file_verified_by_its_header_is_decoded_when_full_is_asked(tmp_path: Path) -> None:
    paths, cache = write_photos(tmp_path / "images"), tmp_path / "cache"
    assert scan(paths, cache, verify="header").checked == len(paths)
    assert scan(paths, cache, verify="full").checked == len(paths), "a header check does not answer for decoding"
    assert scan(paths, cache, verify="full").checked == 0
    assert scan(paths, cache, verify="header").checked == 0, "a decoded file answers a header check"


def test_a_new_min_size_or_pixel_limit_is_applied_without_a_new_check(tmp_path: Path) -> None:
    paths, cache = write_photos(tmp_path / "images"), tmp_path / "cache"
    scan(paths, cache)
    stricter = scan_images(paths, min_size=SIDE + 1, cache_dir=cache)
    assert stricter.checked == 0 and len(stricter.bad) == len(paths)
    assert f"{SIDE}x{SIDE} px is smaller than data.min_size={SIDE + 1}" in stricter.bad[0][1]
    smaller = scan_images(paths, min_size=8, max_pixels=SIDE * SIDE - 1, cache_dir=cache)
    assert smaller.checked == 0 and "is more than data.max_image_pixels" in smaller.bad[0][1]


def test_scans_running_at_once_share_the_cache(tmp_path: Path) -> None:
    paths, cache = write_photos(tmp_path / "images"), tmp_path / "cache"
    results: list[Scan] = []
    threads = [threading.Thread(target=lambda: results.append(scan(paths, cache))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(result.usable == paths for result in results)
    assert scan(paths, cache).checked == 0


def test_a_cache_that_cannot_be_written_is_said_and_every_file_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_photos(tmp_path / "images")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = scan(paths, blocked / "cache")  # a folder below a regular file cannot be made
    assert result.checked == len(paths) and len(result.usable) == len(paths)
    assert "Not remembering verified image files" in caplog.text and "data.cache_dir" in caplog.text


def test_the_folder_loader_takes_verify_and_cache_dir_from_the_config(tmp_path: Path) -> None:
    root, cache = tmp_path / "images", tmp_path / "cache"
    write_photos(root)
    splits = load_image_folder(root, val_fraction=0.2, test_fraction=0.2, verify="header", cache_dir=cache)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 3 * PER_CLASS
    assert (cache / DATABASE).is_file()


def test_the_first_scan_holds_a_bounded_number_of_files_in_flight() -> None:
    drawn = itertools.count()
    taken = list(itertools.islice(bounded_map(lambda item: item * 2, drawn, threads=2), 5))
    assert taken == [0, 2, 4, 6, 8], "in order"
    assert next(drawn) <= 2 * IN_FLIGHT_PER_THREAD + 5, "an endless listing is read only as far as the window"


def digests(root: Path, cache: Path | None) -> tuple[dict[str, str], int]:
    """The dataset digests of the folder's three splits, and how many files were read to make them."""
    from pipeline.data.contents import FileHashes
    from pipeline.tracking.datasets import digest

    splits = load_image_folder(root, cache_dir=cache)
    with FileHashes(cache) as hashes:
        found = {split: digest(getattr(splits, split), splits.classes, hashes) for split in ("train", "val", "test")}
    return found, hashes.read


def test_the_dataset_digest_reads_each_file_once_and_follows_a_changed_file(tmp_path: Path) -> None:
    root, cache = tmp_path / "images", tmp_path / "cache"
    paths = write_photos(root)
    first, read = digests(root, cache)
    assert read == len(paths)
    assert digests(root, None)[0] == first, "the digest is of the contents alone: the same with or without a cache"
    # The proof that the second run reads no file: bytes changed behind the cache's back (same size and time) leave
    # the digest as it was.
    garbled = paths[2]  # a PNG: its scan result is remembered too, so loading passes
    original = garbled.read_bytes()
    rewrite_keeping_stat(garbled, original[:-1] + bytes([original[-1] ^ 1]))
    assert digests(root, cache) == (first, 0)
    # A file that really changed (its time moves) is read again, and changes the digest of its split.
    garbled.write_bytes(original)
    os.utime(garbled, ns=(garbled.stat().st_atime_ns, garbled.stat().st_mtime_ns + 1_000_000_000))
    assert digests(root, cache) == (first, 1), "the same bytes again: read once more, the same digest"
    changed = paths[5]
    Image.new("RGB", (SIDE, SIDE), "white").save(changed, format="PNG")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 2_000_000_000))
    after, read = digests(root, cache)
    assert read == 1
    assert sum(after[split] != first[split] for split in after) == 1, "exactly the split holding the file changed"
