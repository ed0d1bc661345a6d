"""
A judge for 28x28-class grey images (Fashion-MNIST and the rest of the MNIST family), as the
digits have ``judge.DigitJudge``: a small convolutional classifier trained on the training
split, whose predictions give the requested-class accuracy of class-conditional samples and
whose penultimate layer is the feature space of the Frechet distance and precision/recall.

Training it takes about a minute on two CPU cores; the weights are cached in a file keyed by
the training images, their labels and the judge's settings, so that every later measurement
(and every process) reads the same judge. Its accuracy on the held-out split is stored with it.
"""

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class JudgeSettings:
    """What the judge is: its widths and how it is trained (part of its cache key)."""

    conv: tuple = (32, 64)
    hidden: int = 128
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


def judge_network(image_size, num_classes, s):
    """Two conv-ReLU-maxpool stages, a hidden ReLU layer (the features), a linear classifier."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(1, s.conv[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(s.conv[0], s.conv[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(s.conv[1] * side * side, s.hidden), nn.ReLU(),
        nn.Linear(s.hidden, num_classes))


def _pixels(images):
    """NHWC uint8 -> [N, 1, H, W] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def data_key(images, labels, settings):
    """The cache key: a digest of the training images, labels and the settings."""
    h = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()[:16]


def default_cache_dir():
    """``$UNET_CACHE/judges``, else ``~/.cache/unet/judges``."""
    return os.path.join(os.environ.get("UNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unet"),
                        "judges")


def _train(net, images, labels, s):
    g = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    x, y = _pixels(images), torch.as_tensor(labels, dtype=torch.long)
    net.train()
    for _ in range(s.epochs):
        for idx in torch.randperm(len(x), generator=g).split(s.batch_size):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()


class ConvJudge:
    """
    The classifier and its feature space; ``features``, ``predict_proba``, ``predict``,
    ``image_shape`` and ``name`` as ``judge.DigitJudge`` has them.

    :param net: the trained network (``judge_network``).
    :param alive: hidden units active on some training image (constant ones would make
        the covariance singular).
    """

    def __init__(self, net, alive, image_size, test_accuracy=None):
        self.net, self.alive = net.eval(), np.asarray(alive, dtype=bool)
        self.image_shape = (image_size, image_size, 1)
        self.test_accuracy = test_accuracy
        digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()[:12]
        self.name = f"conv-judge-{image_size}-{digest}"

    @torch.no_grad()
    def _run(self, images, upto):
        """The first ``upto`` layers' output for NHWC uint8 images, in chunks, as float64."""
        chunks = [images[i:i + 1024] for i in range(0, len(images), 1024)]
        return np.concatenate([self.net[:upto](_pixels(c)).double().numpy() for c in chunks])

    def hidden(self, images):
        """Penultimate (ReLU) activations of every unit, [N x hidden]."""
        return self._run(images, -1)

    def features(self, images):
        """Penultimate activations of the units alive on the training images, [N x D]."""
        return self.hidden(images)[:, self.alive]

    def predict_proba(self, images):
        return torch.softmax(torch.from_numpy(self._run(images, len(self.net))), 1).numpy()

    def predict(self, images):
        return self.predict_proba(images).argmax(1)


def fit_conv_judge(train, held, settings=JudgeSettings(), cache_dir=None, log=print):
    """
    The ``ConvJudge`` for ``train`` = (NHWC uint8 images, labels): read from the cache when
    one was trained on the same data with the same settings, else trained and cached.

    :param held: (images, labels) of the held-out split: the accuracy it reports.
    :param cache_dir: where judges are kept (default ``default_cache_dir()``).
    """
    images, labels = train
    size, classes = images.shape[1], int(np.max(labels)) + 1
    path = os.path.join(cache_dir or default_cache_dir(), f"judge-{size}-{data_key(images, labels, settings)}")
    net = judge_network(size, classes, settings)
    if os.path.isfile(path + ".safetensors"):
        tensors = load_file(path + ".safetensors")
        net.load_state_dict({k: v for k, v in tensors.items() if k != "alive"})
        with open(path + ".json") as f:
            meta = json.load(f)
        judge = ConvJudge(net, tensors["alive"].numpy(), size, meta["test_accuracy"])
        log(f"judge: {judge.name} from {path}.safetensors (held-out accuracy {judge.test_accuracy:.4f})")
        return judge
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    net = judge_network(size, classes, settings)
    _train(net, images, labels, settings)
    alive = ConvJudge(net, np.ones(settings.hidden, bool), size).hidden(images).std(0) > 0
    judge = ConvJudge(net, alive, size)
    judge.test_accuracy = float((judge.predict(held[0]) == np.asarray(held[1])).mean())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({**{k: v.contiguous() for k, v in net.state_dict().items()}, "alive": torch.from_numpy(alive)},
              tmp + ".safetensors")
    with open(tmp + ".json", "w") as f:
        json.dump({"test_accuracy": judge.test_accuracy, "settings": asdict(settings), "name": judge.name,
                   "train_images": len(images), "seconds": time.perf_counter() - start}, f)
    os.replace(tmp + ".json", path + ".json")  # the metadata first: a weights file always has its metadata
    os.replace(tmp + ".safetensors", path + ".safetensors")
    log(f"judge: {judge.name} trained in {time.perf_counter() - start:.0f} s on {len(images)} images, "
        f"held-out accuracy {judge.test_accuracy:.4f}; cached in {path}.safetensors")
    return judge
