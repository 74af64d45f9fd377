"""FID on Fashion-MNIST with a small classifier's features instead of Inception's.

No Inception weights can be had offline, so the features come from a small CNN trained here on the 60k
Fashion-MNIST training images (28x28 padded to 32x32, values in [-1, 1], as the examples train on). Its
penultimate layer (128 features) feeds torchmetrics' ``FrechetInceptionDistance(feature=extractor)``. The
figure is an FID in that classifier's feature space: comparable between runs that use the same weights, not
with Inception FIDs. Report the classifier's test accuracy beside every FID (``classifier_info()``).

    python benchmarks/fid.py --train          # train (a few minutes on a CPU), report test accuracy, save weights
    python benchmarks/fid.py                  # evaluate the saved weights; FID of 10k train images vs the test set

In code (with the benchmarks folder on ``sys.path``)::

    import fid
    score = fid.fid(real_images, fake_images)             # uint8 [0, 255] or float [-1, 1], (B, 1, 32|28, 32|28)
    extractor = fid.feature_extractor(normalize=False)     # for FrechetInceptionDistance(feature=extractor)

The weights live in ``benchmarks/results/fmnist_classifier.safetensors`` and their accuracy in
``benchmarks/results/fmnist_classifier.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenroute.training import load_fashion_mnist, pad_images

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WEIGHTS = RESULTS_DIR / "fmnist_classifier.safetensors"
ARCHITECTURE = "FashionClassifier-v1"  # bump when the layers change: old weights no longer load
NUM_FEATURES = 128
IMAGE_SIZE = 32


def info_path(weights: str | Path) -> Path:
    """The JSON that records the accuracy of these weights: same name, .json."""
    return Path(weights).with_suffix(".json")


# ------------------------------------------------------------------------------------------------
# The classifier and its feature extractor
# ------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
    """A small CNN for (B, 1, 32, 32) images in [-1, 1]: three conv stages (32 -> 16 -> 8 -> 4), global
    average pooling, a 128-wide hidden layer (the features) and a 10-way head. About 150k parameters."""

    def __init__(self, num_classes: int = 10, num_features: int = NUM_FEATURES):
        super().__init__()
        self.body = nn.Sequential(*_conv(1, 32), nn.MaxPool2d(2),
                                  *_conv(32, 64), nn.MaxPool2d(2),
                                  *_conv(64, 64), *_conv(64, 128), nn.MaxPool2d(2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(128, num_features), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, num_features): the penultimate activations."""
        return self.hidden(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def prepare_images(images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Whatever images come in -> (B, 1, 32, 32) float32 in [-1, 1], the classifier's input.

    uint8 is read as [0, 255]; float as [0, 1] when `normalize` (torchmetrics' convention) else as [-1, 1]
    (the diffusion models' range). (B, H, W) gains a channel; 3 channels are averaged; 28x28 is padded by 2 on
    each side (as the examples pad Fashion-MNIST); any other size is resized bilinearly.
    """
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W) or (B, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 127.5 - 1.0
    elif images.is_floating_point():
        x = images.float() * 2.0 - 1.0 if normalize else images.float()
    else:
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    elif (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate features, as a feature module for torchmetrics' FID.

    `FrechetInceptionDistance(feature=ClassifierFeatures(clf, normalize=N), normalize=N)` hands the images it
    is given straight to this module: uint8 [0, 255] always works; float images are read as [0, 1] when
    `normalize` is True and as [-1, 1] otherwise (see `prepare_images`). Output: (B, 128) float32.
    The classifier stays frozen in eval mode whatever `.train()` is called with.
    """

    def __init__(self, classifier: FashionClassifier, normalize: bool = False):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.normalize = normalize
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        return self.classifier.features(prepare_images(images.to(device), self.normalize)).float()


def load_classifier(weights: str | Path = WEIGHTS, device: torch.device | str = "cpu") -> FashionClassifier:
    """The trained classifier (eval mode) from a safetensors file written by `python benchmarks/fid.py --train`."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"No classifier weights at {weights}; train them with `python benchmarks/fid.py "
                                "--train` (a few minutes on a CPU).")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(weights), "pt") as f:
        arch = (f.metadata() or {}).get("architecture")
    if arch not in (None, ARCHITECTURE):
        raise ValueError(f"{weights} holds {arch} weights; this code builds {ARCHITECTURE}. Retrain with --train.")
    model = FashionClassifier()
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval().requires_grad_(False)


def classifier_info(weights: str | Path = WEIGHTS) -> dict[str, Any]:
    """What `--train` recorded for these weights (test_accuracy, epochs, ...); {} when the JSON is missing."""
    path = info_path(weights)
    return json.loads(path.read_text()) if path.is_file() else {}


def feature_extractor(weights: str | Path = WEIGHTS, device: torch.device | str = "cpu",
                      normalize: bool = False) -> ClassifierFeatures:
    """A `ClassifierFeatures` on the saved weights, ready for `FrechetInceptionDistance(feature=...)`."""
    return ClassifierFeatures(load_classifier(weights, device), normalize=normalize)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float) -> uint8 [0, 255], rounded as when saved to a PNG; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------


class FIDMeter:
    """FID against a fixed reference set, whose features are computed once (torchmetrics keeps them).

    Every image set is quantised to uint8 first (`to_uint8`), as the real images are, and scored in batches
    on `device`. `accuracy(images, labels)` is the classifier's top-1 accuracy on them: on the test images
    that is its test accuracy; on class-conditional samples, how often a sample is recognised as its class.
    """

    def __init__(self, reference: torch.Tensor, *, weights: str | Path = WEIGHTS,
                 device: torch.device | str = "cpu", batch_size: int = 1000):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.extractor = feature_extractor(weights, self.device, normalize=False)
        self.metric = FrechetInceptionDistance(feature=self.extractor, normalize=False,
                                               reset_real_features=False).to(self.device)
        self.num_reference = len(reference)
        for chunk in to_uint8(reference).split(batch_size):
            self.metric.update(chunk.to(self.device), real=True)

    def __call__(self, images: torch.Tensor) -> float:
        """FID of `images` (uint8, or float in [-1, 1]) against the reference set."""
        self.metric.reset()  # drops the previous fake features only
        for chunk in to_uint8(images).split(self.batch_size):
            self.metric.update(chunk.to(self.device), real=False)
        return float(self.metric.compute())

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(self.extractor.classifier, images, labels, self.device, self.batch_size)


def fid(real_images: torch.Tensor, fake_images: torch.Tensor, *, weights: str | Path = WEIGHTS,
        device: torch.device | str = "cpu", batch_size: int = 1000) -> float:
    """FID between two image sets in the classifier's feature space. Images: uint8 [0, 255] or float [-1, 1],
    (B, 1, 32, 32) or (B, 1, 28, 28) (or (B, H, W)); at least 2 of each."""
    return FIDMeter(real_images, weights=weights, device=device, batch_size=batch_size)(fake_images)


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device | str = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy of `classifier` on images (uint8 or float [-1, 1]) with integer labels."""
    was_training = classifier.training
    classifier.eval()
    correct = 0
    try:
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            logits = classifier(prepare_images(to_uint8(x).to(device)))
            correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
    finally:
        classifier.train(was_training)
    return correct / max(len(labels), 1)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def load_split(split: str, data_dir: str | Path | None = None, download: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 32, 32) uint8 images and (N,) labels of one Fashion-MNIST split ("train" or "t10k")."""
    images, labels = load_fashion_mnist(data_dir, splits=(split,), download=download)
    return pad_images(images), labels


def train_classifier(data_dir: str | Path | None = None, *, epochs: int = 4, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, log=None) -> tuple[FashionClassifier, dict[str, Any]]:
    """Train on the 60k training images (random shifts of up to 2 pixels), AdamW with a one-cycle schedule;
    returns the model (eval mode) and what to record: test accuracy on the 10k test images, timings."""
    log = log or (lambda text: print(text, flush=True))
    torch.manual_seed(seed)
    x_train, y_train = load_split("train", data_dir)
    x_test, y_test = load_split("t10k", data_dir)
    model = FashionClassifier().to(memory_format=torch.channels_last)  # about 1.4x faster convolutions on a CPU
    steps_per_epoch = len(x_train) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        total, seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = prepare_images(x_train[idx])
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # one shift per batch: cheap augmentation
            x = torch.roll(x, shifts=shift, dims=(2, 3)).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        acc = accuracy(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": total / seen, "test_accuracy": acc,
                        "seconds": time.perf_counter() - began})
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / seen:.4f}, test accuracy {acc:.4f} "
            f"({time.perf_counter() - began:.0f} s)")
    model.eval()
    info = {"architecture": ARCHITECTURE, "num_features": NUM_FEATURES,
            "parameters": sum(p.numel() for p in model.parameters()),
            "test_accuracy": history[-1]["test_accuracy"], "test_images": len(x_test),
            "train_images": len(x_train), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_seconds": time.perf_counter() - began, "history": history, "input": "(B, 1, 32, 32) in [-1, 1]",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    return model, info


def save_classifier(model: FashionClassifier, info: dict[str, Any], weights: str | Path = WEIGHTS) -> Path:
    from safetensors.torch import save_file

    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"architecture": ARCHITECTURE,
                                             "test_accuracy": f"{info['test_accuracy']:.4f}"})
    info = {**info, "weights": weights.name, "weights_bytes": weights.stat().st_size}
    info_path(weights).write_text(json.dumps(info, indent=2) + "\n")
    return weights


def real_data_floor(data_dir: str | Path | None, weights: str | Path, num: int = 10_000, seed: int = 0
                    ) -> float:
    """FID of `num` random training images against the test set: how low FID gets on real data."""
    x_train, _ = load_split("train", data_dir)
    x_test, _ = load_split("t10k", data_dir)
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:num]
    return fid(x_test, x_train[idx], weights=weights)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train the classifier and save it (else evaluate it)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST idx .gz files (default: the Debian "
                        "package's /usr/share/datasets/fashion-mnist/)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="safetensors file (a .json goes beside it)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.train:
        model, info = train_classifier(args.data_dir, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       seed=args.seed)
        save_classifier(model, info, args.weights)
        info["fid_train10k_vs_test"] = real_data_floor(args.data_dir, args.weights)
        info = {**json.loads(info_path(args.weights).read_text()), "fid_train10k_vs_test": info["fid_train10k_vs_test"]}
        info_path(args.weights).write_text(json.dumps(info, indent=2) + "\n")
        print(f"test accuracy {info['test_accuracy']:.4f}; FID of 10k training images vs the test set "
              f"{info['fid_train10k_vs_test']:.4f}; wrote {args.weights} ({info['weights_bytes']} bytes) and "
              f"{info_path(args.weights)}")
        return info
    model = load_classifier(args.weights)
    x_test, y_test = load_split("t10k", args.data_dir)
    acc = accuracy(model, x_test, y_test)
    floor = real_data_floor(args.data_dir, args.weights)
    recorded = classifier_info(args.weights).get("test_accuracy")
    print(f"{args.weights}: test accuracy {acc:.4f} (recorded {recorded}); FID of 10k training images vs the "
          f"test set {floor:.4f}")
    return {"test_accuracy": acc, "recorded_test_accuracy": recorded, "fid_train10k_vs_test": floor}


if __name__ == "__main__":
    main()
