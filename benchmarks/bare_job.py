"""The default job written by hand in plain PyTorch: what `python -m pipeline.train` is measured against
(benchmarks/whole_job.py).

    .venv/bin/python benchmarks/bare_job.py --epochs 30 --batch-size 64 --lr 0.05 --out /tmp/bare

The same work as the default config: LeNet-5 (tanh, average pooling) on scikit-learn's digits resized to 32×32, the
same 70/15/15 stratified split, the `affine` augmentation with Albumentations per image, SGD with Nesterov momentum
and weight decay, one epoch of linear warm-up then cosine decay per step, a validation pass after every epoch, the
best epoch's weights kept and tested at the end, and the checkpoint saved. What it leaves out is what the pipeline
adds: config composition and checks, experiment tracking, the logged model, figures, resume and fault handling.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset

MEAN, STD = 0.305, 0.323


class Digits(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: A.Compose | None) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        tensor = torch.from_numpy((image - MEAN) / STD).unsqueeze(0)
        return tensor, int(self.labels[index])


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10),
    )  # fmt: skip


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            seen += len(labels)
    return correct / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    digits = load_digits()
    images = np.stack([A.Resize(32, 32)(image=(image / 16.0).astype(np.float32))["image"] for image in digits.images])
    labels = digits.target
    train_x, rest_x, train_y, rest_y = train_test_split(images, labels, test_size=0.3, stratify=labels, random_state=0)
    val_x, test_x, val_y, test_y = train_test_split(rest_x, rest_y, test_size=0.5, stratify=rest_y, random_state=0)
    # p=1.0 as conf/aug/affine.yaml has it: Albumentations' default (0.5) would distort only half the images.
    affine = A.Compose(
        [A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-10, 10), shear=(-10, 10), p=1.0)]
    )
    train = DataLoader(Digits(train_x, train_y, affine), args.batch_size, shuffle=True)
    val = DataLoader(Digits(val_x, val_y, None), args.batch_size)
    test = DataLoader(Digits(test_x, test_y, None), args.batch_size)

    model = lenet5()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    steps, warmup = args.epochs * len(train), len(train)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    criterion = nn.CrossEntropyLoss()
    best, best_state = -1.0, None
    for epoch in range(args.epochs):
        model.train()
        for batch, target in train:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(batch), target)
            loss.backward()
            optimizer.step()
            schedule.step()
        val_acc = accuracy(model, val)
        print(f"epoch {epoch} loss {loss.item():.4f} val/acc {val_acc:.4f}", flush=True)
        if val_acc > best:
            best, best_state = val_acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, args.out / "best.ckpt")
    print(f"test/acc {accuracy(model, test):.4f}")


if __name__ == "__main__":
    main()
