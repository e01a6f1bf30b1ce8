"""Time per training epoch: pipeline's run(cfg) against a bare PyTorch loop, side by side in one process.

    .venv/bin/python benchmarks/overhead.py [--epochs 6] [--rounds 3] [--threads 2] [--clock wall|cpu] [--profile]
        [--case lenet5_digits] [--case resnet18_32px]

Both sides get the same model (built by the same factory from the same seed), the same images, the same
augmentation (the config's Albumentations pipeline), the same batch size and the same thread count. An epoch
is one pass over the training split plus one over the validation split, as in run(cfg); the bare loop keeps
a running loss and accuracy as a hand-written loop would. The first epoch of each side is warm-up and is not
counted. The sides alternate (bare, pipeline, bare, …) so a noisy neighbour hits both; the ratio is that of the
medians over all rounds, and each round's own ratio shows how much the machine drifted. `--profile` prints
where the pipeline's per-step time goes (Lightning's simple profiler). Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config import compose
from pipeline.data.datamodule import TransformedImages
from pipeline.data.normalize import Normalize
from pipeline.run import build_data, build_inputs, run

CLOCK = time.perf_counter  # --clock cpu: time.process_time, the CPU time of the whole process (every thread)

CASES = {
    "lenet5_digits": ["model=lenet5"],
    "resnet18_32px": ["model=classic_resnet18_cifar", "data.image_size=[32,32]"],
}


class EpochClock(Callback):
    """Wall time of each epoch: the training pass and the validation after it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = CLOCK()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seconds.append(CLOCK() - self.start)


def pipeline_epochs(overrides: Sequence[str], epochs: int, profile: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as root:
        extra = ["+trainer.profiler=simple"] if profile else []
        cfg = compose([f"paths.root={root}", f"paths.output_dir={root}/out", *overrides, *extra])
        clock = EpochClock()
        run(cfg, callbacks=[clock])
    return clock.seconds[1:]


def bare_epochs(overrides: Sequence[str], epochs: int) -> list[float]:
    """The loop a user would write by hand around the same model, data and augmentation."""
    with tempfile.TemporaryDirectory() as root:
        cfg = compose([f"paths.root={root}", f"paths.output_dir={root}/out", *overrides])
        torch.manual_seed(cfg.seed)
        inputs = build_inputs(cfg)
        data = build_data(cfg, inputs.splits, inputs.spec)
        model = inputs.model
        normalize = Normalize(inputs.spec.mean, inputs.spec.std)  # the loaders hand over uint8, as in training
        train = DataLoader(TransformedImages(inputs.splits.train, data.train_transform), cfg.data.batch_size, True)
        val = DataLoader(TransformedImages(inputs.splits.val, data.eval_transform), cfg.data.batch_size)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=cfg.optim.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train))
        criterion = nn.CrossEntropyLoss()
        seconds = []
        for _ in range(epochs):
            start = CLOCK()
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            for images, labels in train:
                optimizer.zero_grad(set_to_none=True)
                logits = model(normalize(images))
                loss = criterion(logits, labels)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.item() * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
            model.eval()
            with torch.no_grad():
                val_correct = sum(int((model(normalize(images)).argmax(1) == labels).sum()) for images, labels in val)
            seconds.append(CLOCK() - start)
            del val_correct
        return seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: less sensitive to other tenants of the machine"
    )
    parser.add_argument("--verbose", action="store_true", help="print every epoch's time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, {args.threads} threads, {args.epochs} epochs/side, "
        f"{args.clock} clock"
    )
    print(
        "\n| case | bare loop (s/epoch) | pipeline (s/epoch) | ratio | ratio per round (min–max) |"
        "\n|---|---:|---:|---:|---:|"
    )
    for case in args.case or sorted(CASES):
        common = [
            *CASES[case],
            f"trainer.max_epochs={args.epochs}",
            "progress=none",
            "trainer.enable_model_summary=false",
            "logger.log_checkpoint=false",
            "scheduler.warmup_epochs=0",
        ]
        bare, piped, per_round = [], [], []
        for round_ in range(args.rounds):
            bare_round = bare_epochs(common, args.epochs)
            piped_round = pipeline_epochs(common, args.epochs, profile=False)
            bare, piped = bare + bare_round, piped + piped_round
            per_round.append(statistics.median(piped_round) / statistics.median(bare_round))
            if args.verbose:
                print(f"  round {round_}: bare {bare_round} pipeline {piped_round} ratio {per_round[-1]:.3f}")
        b, p = statistics.median(bare), statistics.median(piped)
        spread = f"{min(per_round):.2f}–{max(per_round):.2f}"
        print(f"| {case} | {b:.3f} | {p:.3f} | {p / b:.2f}× | {spread} |", flush=True)
        if args.profile:
            pipeline_epochs(common, args.epochs, profile=True)


if __name__ == "__main__":
    main()
