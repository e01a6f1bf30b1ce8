"""Shards as written and as streamed, read from a local folder: the format is WebDataset's (its own library reads it),
every rank draws the same exact number of batches and no sample twice, an epoch resumed after k batches draws the very
batches an uninterrupted one would, and a folder that is not a shard set stops the load with an error that says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.errors import DataError
from pipeline.data.images import ImageSet, ImageSplits
from pipeline.data.shard_store import INDEX, Store
from pipeline.data.shard_stream import ShardLoader, ShardStream
from pipeline.data.shard_writer import write_shards
from pipeline.data.shards import ShardSet, StreamOptions, load_shards

IMAGES = 1000


def numbered(count: int, first: int = 0) -> ImageSet:
    """Images that carry their own number in their first two pixels, so a batch says which samples it holds."""
    numbers = np.arange(first, first + count)
    images = np.zeros((count, 8, 8, 1), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = numbers // 256, numbers % 256
    return ImageSet(images, (numbers % 4).astype(np.int64))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    splits = ImageSplits(numbered(IMAGES), numbered(101, IMAGES), numbered(99, 2000), ["a", "b", "c", "d"])
    write_shards(splits, Store(str(folder)), max_samples=90, max_bytes=10**9, shuffle_seed=0, source={"test": 1})
    return folder


def identity(image: np.ndarray) -> dict[str, torch.Tensor]:
    return {"image": torch.from_numpy(image.copy())}


def sample_numbers(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 1, 0].long()).tolist()


def batches(
    folder: Path,
    split: str = "train",
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    epoch: int = 0,
    done: int = 0,
    batch: int = 32,
    drop_last: bool = False,
    block: int = 50,
) -> list[list[int]]:
    data = load_shards(str(folder), shuffle_block=block)
    part = getattr(data, split)
    assert isinstance(part, ShardSet)
    part.options = StreamOptions(True, block)
    stream = ShardStream(part, identity, batch, split == "train", seed=7, rank=rank, world=world, drop_last=drop_last)
    loader = ShardLoader(stream, lambda: (epoch, done), num_workers=workers)
    drawn = [sample_numbers(images) for images, _ in loader]
    assert len(drawn) == len(loader) - (done if split == "train" else 0), "the loader's length is exact"
    return drawn


def test_the_shards_are_webdataset_tars_its_own_library_reads(shards: Path) -> None:
    import webdataset as wds

    index = json.loads((shards / INDEX).read_text())
    names = [shard["name"] for shard in index["splits"]["train"]["shards"]]
    assert len(names) == 12 and all((shards / name).is_file() for name in names)  # 1,000 images, 90 a shard
    samples = list(wds.WebDataset([str(shards / name) for name in names], shardshuffle=False).decode("l8"))
    assert len(samples) == IMAGES
    numbers = [int(sample["png"][0, 0]) * 256 + int(sample["png"][0, 1]) for sample in samples]
    assert sorted(numbers) == list(range(IMAGES)), "every image once, pixels unchanged (lossless PNG)"
    assert numbers != sorted(numbers), "the training split is written shuffled"
    assert [sample["cls"] for sample in samples] == [n % 4 for n in numbers]
    data = load_shards(str(shards))
    assert data.classes == ["a", "b", "c", "d"] and data.channels == 1
    assert [len(data.train), len(data.val), len(data.test)] == [IMAGES, 101, 99]
    image, label = data.train[500]  # single images, read from where the index says they begin
    assert int(image[0, 0, 0]) * 256 + int(image[0, 1, 0]) == numbers[500] and label == numbers[500] % 4


@pytest.mark.parametrize(("world", "workers", "drop_last"), [(1, 0, False), (2, 2, False), (3, 0, True), (3, 2, False)])
def test_every_rank_draws_the_same_exact_number_of_batches_and_no_sample_twice(
    shards: Path, world: int, workers: int, drop_last: bool
) -> None:
    per_rank = [batches(shards, rank=rank, world=world, workers=workers, drop_last=drop_last) for rank in range(world)]
    assert len({len(drawn) for drawn in per_rank}) == 1, "the same batch count on every rank"
    share = IMAGES // world
    expected = share // 32 if drop_last else -(-share // 32)
    assert all(len(drawn) == expected for drawn in per_rank)
    seen = [number for drawn in per_rank for batch in drawn for number in batch]
    assert len(seen) == len(set(seen)) == world * (share // 32 * 32 if drop_last else share)
    assert all(len(batch) == 32 for drawn in per_rank for batch in drawn[:-1]), "only a rank's last batch is short"


def test_evaluation_splits_are_read_exactly_once_across_ranks_in_order(shards: Path) -> None:
    seen = [n for rank in range(3) for batch in batches(shards, "val", rank=rank, world=3, workers=2) for n in batch]
    assert sorted(seen) == list(range(IMAGES, IMAGES + 101))


def test_each_epoch_reads_another_order_and_a_resumed_epoch_goes_on_with_the_same_batches(shards: Path) -> None:
    first, second = batches(shards, workers=2, epoch=0), batches(shards, workers=2, epoch=1)
    assert sorted(n for batch in first for n in batch) == sorted(n for batch in second for n in batch)
    assert sorted(n for batch in first for n in batch) == list(range(IMAGES))
    assert first != second, "shards and blocks are shuffled anew each epoch"
    assert batches(shards, workers=2, epoch=1) == second, "the same seed and epoch draw the same batches"
    for done in (1, 6, 30):  # within a block, across blocks and shards, the last batch
        assert batches(shards, workers=2, epoch=1, done=done) == second[done:]
    assert batches(shards, rank=1, world=2, workers=0, epoch=3, done=5) == batches(shards, rank=1, world=2, epoch=3)[5:]


def write_index(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).write_text(text)


def test_a_folder_that_is_not_a_shard_set_stops_the_load_with_what_to_do(shards: Path, tmp_path: Path) -> None:
    cases: dict[str, tuple[Path | str, str]] = {}
    cases["missing"] = (tmp_path / "nowhere", "no such folder")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a-000000.tar").write_bytes(b"x")
    cases["no index"] = (tmp_path / "loose", "dataset.json not found (it holds 1 .tar files but no index)")
    write_index(tmp_path / "text", "not json")
    cases["not json"] = (tmp_path / "text", "is not a shard index")
    write_index(tmp_path / "other", json.dumps({"format": "litdata"}))
    cases["another format"] = (tmp_path / "other", "is not an index written by `python -m pipeline.shard`")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "val-000001.tar").unlink()
    cases["a shard missing"] = (copy, "1 shard(s) listed in dataset.json are missing or changed")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in shards.iterdir():
        data = path.read_bytes()
        (damaged / path.name).write_bytes(data if path.suffix != ".tar" else bytes(range(256)) * (len(data) // 256))
    cases["not a tar"] = (damaged, "not a WebDataset tar shard")
    cases["a scheme we cannot read"] = ("http://example.com/shards", "must be a folder or s3://bucket/prefix")
    for case, (url, message) in cases.items():
        with pytest.raises(DataError) as raised:
            load_shards(str(url))
        assert message in str(raised.value), case
        assert "pipeline.shard" in str(raised.value) or case == "a scheme we cannot read", case


def test_an_s3_endpoint_that_does_not_answer_fails_in_seconds_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers.mlflow_server import free_port
    from tests.helpers.s3_server import CREDENTIALS

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)

    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError) as raised:
        load_shards("s3://bucket/shards", endpoint_url=endpoint)
    assert f"the S3 endpoint {endpoint} does not answer" in str(raised.value)


def test_a_shard_damaged_but_its_size_unchanged_stops_the_read_instead_of_losing_samples(
    shards: Path, tmp_path: Path
) -> None:
    """tarfile takes a damaged header in a stream for the archive's end: the read counts what the index promises."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    train = load_shards(str(copy)).train
    shard, info = copy / train.shards[0].name, train.shards[0]
    header = info.byte_range(info.samples // 2, info.samples // 2 + 1)[0]  # the tar header of a sample in the middle
    data = bytearray(shard.read_bytes())
    data[header : header + 512] = bytes(512)  # a block of zeros: the end of an archive, to tarfile; the size is kept
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000000\.tar: samples 0-\d+ hold \d+ readable samples, .*damaged"):
        list(train.encoded(0, 0, train.shards[0].samples))


def test_a_users_error_from_a_loader_worker_is_said_without_the_workers_traceback() -> None:
    from pipeline.cli import user_message

    remade = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\npipeline.data.errors.DataError: /d/train-000000.tar: damaged. Convert again.\n'
    )
    assert user_message(remade) == "/d/train-000000.tar: damaged. Convert again."
    assert user_message(DataError("data.url is not set: give …")) == "data.url is not set: give …"
