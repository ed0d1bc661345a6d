"""The MNIST family as a data source: IDX folders the tests write (official split kept, sizes
as is / padded / pooled, one-line refusals), the offline hub fallback, and a few training steps
on Debian's real Fashion-MNIST files when they are installed."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import unet.data.mnist as mnist
from unet.cli import train as train_script
from unet.config import ConfigError, TrainConfig, load_config
from unet.data.dataset import DataError, fixed_batch, load_image_data
from unet.utils.idx import write_idx

QUIET = dict(log=lambda *a: None)


def idx_folder(root, n_train=40, n_test=12, size=28, classes=10, test=True):
    """MNIST-layout files whose images are all distinct (image i has pixel (0, 0) = i for
    train, 200 + i for test), labels i mod classes."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for split, n, first in (("train", n_train, 0), ("t10k", n_test, 200))[: 2 if test else 1]:
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        x[:, 0, 0] = np.arange(first, first + n)
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), x)
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), (np.arange(n) % classes).astype(np.uint8))
    return str(root)


def cfg_for(folder, **kw):
    kw = {"class_cond": "false", **kw}
    return load_config(["--dataset", "idx", "--data_dir", folder, "--report_to", "none",
                        *[str(a) for k, v in kw.items() for a in (f"--{k}", v)]])


def test_official_split_is_kept_and_labels_are_classes(tmp_path):
    folder = idx_folder(tmp_path / "d")
    data = load_image_data(cfg_for(folder, eval_fraction=0.5, class_cond="true"), **QUIET)  # not re-split
    assert (len(data.train), len(data.eval), data.num_classes) == (40, 12, 10)
    xt, yt = fixed_batch(data.train, 40)
    xe, ye = fixed_batch(data.eval, 12)
    corner = lambda x: ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()  # noqa: E731
    assert corner(xt) == list(range(40)) and corner(xe) == list(range(200, 212))  # no train image held out
    assert yt.tolist() == [i % 10 for i in range(40)] and ye.tolist() == [i % 10 for i in range(12)]
    assert xt.shape == (40, 1, 28, 28) and xt.min() >= -1 and xt.max() <= 1


def test_no_test_split_holds_out_eval_fraction(tmp_path):
    data = load_image_data(cfg_for(idx_folder(tmp_path / "d", test=False), eval_fraction=0.25), **QUIET)
    assert (len(data.train), len(data.eval)) == (30, 10)


def test_pooling_to_14_is_the_mean_of_each_2x2_block(tmp_path):
    folder = idx_folder(tmp_path / "d", n_train=3, n_test=2)
    raw = mnist.read_arrays(cfg_for(folder))[0]["train"][0].astype(np.float64)
    x, _ = fixed_batch(load_image_data(cfg_for(folder, image_size=14), **QUIET).train, 3)
    hand = np.zeros((3, 14, 14))
    for i in range(14):
        for j in range(14):
            hand[:, i, j] = (raw[:, 2 * i, 2 * j] + raw[:, 2 * i + 1, 2 * j] + raw[:, 2 * i, 2 * j + 1]
                             + raw[:, 2 * i + 1, 2 * j + 1]) / 4 / 127.5 - 1
    assert x.shape == (3, 1, 14, 14)
    np.testing.assert_allclose(x[:, 0].double().numpy(), hand, rtol=0, atol=1e-6)  # float32 of exact quarters


def test_padding_to_32_adds_black_borders(tmp_path):
    folder = idx_folder(tmp_path / "d", n_train=3, n_test=2)
    x28, _ = fixed_batch(load_image_data(cfg_for(folder), **QUIET).train, 3)
    x32, _ = fixed_batch(load_image_data(cfg_for(folder, image_size=32), **QUIET).train, 3)
    assert torch.equal(x32[..., 2:30, 2:30], x28)
    border = torch.ones_like(x32, dtype=torch.bool)
    border[..., 2:30, 2:30] = False
    assert (x32[border] == -1).all()


def test_other_sizes_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match="image_size': got 20; the images are 28x28"):
        load_image_data(cfg_for(idx_folder(tmp_path / "d"), image_size=20, channel_mult="1,2"), **QUIET)
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="holds no MNIST-layout IDX files"):
        load_image_data(cfg_for(str(tmp_path / "empty")), **QUIET)
    with pytest.raises(ConfigError, match="image_size"):
        load_config(["--dataset", "fashion_mnist", "--image_size", "20"])


def test_a_count_mismatch_names_the_file(tmp_path):
    folder = idx_folder(tmp_path / "d")
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), np.zeros(39, np.uint8))
    with pytest.raises(DataError, match="39 labels for 40 images"):
        load_image_data(cfg_for(folder), **QUIET)


def test_dataset_defaults_follow_the_data():
    cfg = load_config(["--dataset", "fashion_mnist"])
    assert (cfg.image_size, cfg.channel_mult, cfg.attention_resolutions, cfg.class_cond, cfg.output_dir) == \
        (28, [1, 2, 2], [7], True, "outputs/fashion_mnist")
    pooled = load_config(["--dataset", "fashion_mnist", "--image_size", "14"])
    assert (pooled.channel_mult, pooled.attention_resolutions) == ([1, 2], [7])
    own = load_config(["--dataset", "imagefolder", "--data_dir", "x", "--image_size", "32", "--channels", "3"])
    assert (own.attention_resolutions, own.class_cond, own.output_dir) == ([16], False, "outputs/imagefolder")
    assert load_config([]) == TrainConfig()  # the digits run is what it was
    kept = load_config(["--dataset", "imagefolder", "--data_dir", "x", "--class_cond", "true", "--output_dir", "o"])
    assert kept.class_cond and kept.output_dir == "o"  # what the user sets is never replaced


OFFLINE = """
import sys
import unet.data.mnist as m
m.FASHION_MNIST_DIRS = ({missing!r},)
from unet.cli import train
sys.exit(train.main(["--dataset", "fashion_mnist", "--report_to", "none", "--output_dir", {out!r}]))
"""


def test_fashion_mnist_without_files_or_network_is_one_line(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = OFFLINE.format(missing=str(tmp_path / "nowhere"), out=str(tmp_path / "run"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr
    assert "apt-get install dataset-fashion-mnist" in err[0] and "data_dir" in err[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_idx_without_files_exits_before_training(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    code = train_script.main(["--dataset", "idx", "--data_dir", str(tmp_path / "empty"), "--report_to", "none",
                              "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "holds no MNIST-layout IDX files" in err[0]


REAL = mnist.FASHION_MNIST_DIRS[0]


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"Fashion-MNIST is not installed in {REAL} "
                    "(apt-get install dataset-fashion-mnist)")
def test_trains_a_few_steps_on_the_real_files(tmp_path):
    cfg = load_config(["--dataset", "fashion_mnist", "--image_size", "14", "--max_steps", "3", "--batch_size", "8",
                       "--num_res_blocks", "1", "--report_to", "none", "--progress", "false", "--eval_every", "2",
                       "--eval_batch_size", "16", "--fid_every", "0", "--sample_every", "-1",
                       "--diagnostics_every", "0", "--output_dir", str(tmp_path / "run")])
    data = load_image_data(cfg, **QUIET)
    assert (len(data.train), len(data.eval), data.num_classes) == (60000, 10000, 10)
    from unet.train.loop import train

    out = train(cfg)
    assert out["steps"] == 3 and out["stop_reason"] == "max_steps" and np.isfinite(out["final_eval_loss"])
