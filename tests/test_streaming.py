"""Data that streams (issue 26): webdataset tar shards written here, read as a stream split by
node; resume restores the stream position (no example repeated within the epoch, and with
shuffle_buffer 0 the same weights as a straight run); a local parquet folder through the
hub-loader code path (``load_dataset("parquet", ...)``), also streamed; one-line errors."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_training import files_equal, stop_and_resume
from test_training import tiny as _tiny

from unet.cli import train as train_script
from unet.config import FIELDS
from unet.data.dataset import load_image_data
from unet.data.streaming import StreamBatches, load_data
from unet.train.checkpoint import latest_checkpoint
from unet.train.loop import train


def tiny(out, **kw):
    """test_training's seconds-long run, without the in-training sample-quality measurement."""
    return _tiny(out, **{**({"fid_every": 0} if "fid_every" in FIELDS else {}), **kw})


def ident(k):
    """Example k's image: a flat grey level that identifies it after decoding."""
    return Image.fromarray(np.full((8, 8), 5 * k, dtype=np.uint8), mode="L")


def example_ids(images):
    """The example ids of a decoded [N, 1, 8, 8] batch in [-1, 1]."""
    return [int(round((float(x[0, 0, 0]) + 1) * 127.5 / 5)) for x in images]


def write_shards(folder, shards, per_shard=10):
    """``shards`` webdataset tars of ``per_shard`` PNG + cls examples; example k = shard * per_shard + i."""
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"train-{s:04d}.tar"), "w") as tf:
            for i in range(per_shard):
                k = s * per_shard + i
                png = io.BytesIO()
                ident(k).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("cls", str(k % 10).encode())):
                    info = tarfile.TarInfo(f"ex{k:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def wds(out, shards_dir, **kw):
    return tiny(out, dataset="webdataset", data_dir=str(shards_dir), label_column="cls", batch_size=4,
                eval_batch_size=8, **kw)


def draw(loader_iter, batches):
    return [i for _ in range(batches) for i in example_ids(next(loader_iter)[0])]


def test_a_resumed_stream_continues_where_it_stopped_without_repeating(tmp_path):
    cfg = wds(tmp_path / "run", write_shards(tmp_path / "shards", 3), shuffle_buffer=8)
    data = load_data(cfg, log=lambda *a: None)
    loader = StreamBatches(data, cfg, 0, 1, seed=0, per=4)
    it = iter(loader)
    first = draw(it, 3)
    state = loader.state_dict()
    again = load_data(cfg, log=lambda *a: None)
    again.stream["resume"] = [state]
    rest = draw(iter(StreamBatches(again, cfg, 0, 1, seed=0, per=4)), 3)
    seen = first + rest
    assert len(set(seen)) == len(seen) == 24 and set(seen) <= set(range(30))  # nothing repeats in the epoch
    assert state["epoch"] == 0 and state["stream"] is not None


def test_two_processes_read_disjoint_shards(tmp_path):
    cfg = wds(tmp_path / "run", write_shards(tmp_path / "shards", 4), shuffle_buffer=0)
    ranks = []
    for rank in (0, 1):
        it = iter(StreamBatches(load_data(cfg, log=lambda *a: None), cfg, rank, 2, seed=0, per=2))
        ranks.append(set(draw(it, 10)))  # one epoch of this process's 20 examples
    assert ranks[0].isdisjoint(ranks[1]) and ranks[0] | ranks[1] == set(range(40))
    # whole shards each: example k is in shard k // 10
    assert [sorted({k // 10 for k in r}) for r in ranks] == [[0, 2], [1, 3]]


def test_webdataset_training_resumes_bit_exactly_without_a_shuffle_buffer(tmp_path):
    shards = write_shards(tmp_path / "shards", 3)
    cfg = wds(tmp_path / "straight", shards, shuffle_buffer=0, checkpoint_every=3)
    assert cfg.max_steps == 6
    full = train(cfg)
    resumed = stop_and_resume(cfg, tmp_path / "resumed")
    a, b = latest_checkpoint(cfg.output_dir), latest_checkpoint(str(tmp_path / "resumed"))
    assert files_equal(a, b, "model.safetensors") and files_equal(a, b, "ema_0.999.safetensors")
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"][3:]]


def write_parquet(folder, n=24):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=[str(i) for i in
                                                                                               range(10)])})
    ds = datasets.Dataset.from_dict({"img": [ident(k) for k in range(n)], "digit": [k % 10 for k in range(n)]},
                                    features=features)
    os.makedirs(folder, exist_ok=True)
    ds.to_parquet(os.path.join(folder, "train-00000.parquet"))
    return folder


def test_a_local_parquet_folder_goes_through_the_hub_loader_and_streams(tmp_path):
    folder = write_parquet(tmp_path / "pq")
    cfg = tiny(tmp_path / "run", dataset="parquet", data_dir=str(folder), eval_fraction=0.25, batch_size=4)
    data = load_image_data(cfg, log=lambda *a: None)
    assert (len(data.train), len(data.eval), data.num_classes) == (18, 6, 10)
    ids = example_ids([data.train[i]["image"] for i in range(len(data.train))])
    assert sorted(ids + example_ids([data.eval[i]["image"] for i in range(6)])) == list(range(24))
    assert all(data.train[i]["label"] == ids[i] % 10 for i in range(len(ids)))
    ordered = cfg.replace(streaming=True, shuffle_buffer=0)
    x, y = next(iter(StreamBatches(load_data(ordered, log=lambda *a: None), ordered, 0, 1, seed=0, per=4)))
    assert example_ids(x) == [0, 1, 2, 3] and y.tolist() == [0, 1, 2, 3]
    s = train(cfg.replace(streaming=True, max_steps=2))
    assert s["steps"] == 2 and s["skipped_images"] == 0


def test_a_corrupt_image_in_a_stream_is_skipped_and_counted(tmp_path):
    shards = write_shards(tmp_path / "shards", 1)
    with tarfile.open(os.path.join(shards, "train-0001.tar"), "w") as tf:
        for name, data in (("bad0001.png", b"not a png"), ("bad0001.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = wds(tmp_path / "run", shards, shuffle_buffer=0)
    data = load_data(cfg, log=lambda *a: None)
    draw(iter(StreamBatches(data, cfg, 0, 1, seed=0, per=4)), 3)  # 12 of 10 + 1 examples: wraps into epoch 1
    assert data.skipped == 1


def test_a_decompression_bomb_in_a_stream_is_skipped_not_raised(tmp_path, monkeypatch):
    """PIL's DecompressionBombError is no OSError: the stream's decode catches it as the
    up-front check does (data.DECODE_ERRORS, one list for both)."""
    from unet.data.streaming import decode

    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, format="PNG")  # 4096 pixels: a bomb under the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above twice the limit
    cfg = wds(tmp_path / "run", write_shards(tmp_path / "shards", 1))
    assert decode({"png": {"bytes": buf.getvalue(), "path": None}, "cls": 3}, "png", "cls", cfg) is None


@pytest.mark.parametrize("argv, code, words", [
    (["--dataset", "webdataset", "--data_dir", "{tmp}/nothing-*.tar"], 2, "matches no shard"),
    (["--dataset", "webdataset"], 2, "'data_dir'"),
    (["--dataset", "digits", "--streaming", "true"], 2, "'streaming'"),
    (["--dataset", "parquet", "--data_dir", "{pq}", "--image_column", "picture"], 1, "no column 'picture'"),
])
def test_bad_data_sources_are_one_line(tmp_path, capsys, argv, code, words):
    pq = write_parquet(tmp_path / "pq")
    argv = [a.format(tmp=tmp_path, pq=pq) for a in argv]
    out = tmp_path / "out"
    extra = ["--fid_every", "0"] if "fid_every" in FIELDS else []
    capsys.readouterr()  # the parquet writer's progress bar
    assert train_script.main(["--output_dir", str(out), "--report_to", "none", "--max_steps", "1", *extra,
                              *argv]) == code
    # datasets' progress bars (loading the parquet folder) are not messages; the error is one line
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and words in err[0], err
    if code == 2:
        assert not (out / "checkpoints").exists()


def write_int_labels(folder, labels, dtype="int64"):
    """A parquet folder whose label column is plain numbers, not a ClassLabel."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "digit": datasets.Value(dtype)})
    ds = datasets.Dataset.from_dict({"img": [ident(k) for k in range(len(labels))], "digit": labels},
                                    features=features)
    os.makedirs(folder, exist_ok=True)
    ds.to_parquet(os.path.join(folder, "train-00000.parquet"))
    return folder


def test_a_plain_integer_label_column_trains_class_conditionally(tmp_path):
    folder = write_int_labels(tmp_path / "pq", [k % 10 for k in range(24)])
    cfg = tiny(tmp_path / "run", dataset="parquet", data_dir=str(folder), label_column="digit", class_cond=True,
               eval_fraction=0.25, batch_size=4)
    data = load_image_data(cfg, log=lambda *a: None)
    assert data.num_classes == 10
    ids = example_ids([data.train[i]["image"] for i in range(len(data.train))])
    assert [data.train[i]["label"] for i in range(len(ids))] == [k % 10 for k in ids]
    assert train(cfg.replace(max_steps=2))["steps"] == 2


@pytest.mark.parametrize("labels,dtype,words", [
    ([k % 10 for k in range(23)] + [12], "int64", "label 12 in column 'digit' is outside num_classes=10"),
    ([-1] + [k % 10 for k in range(23)], "int64", "label -1 in column 'digit' is outside num_classes=10"),
    ([0.5] * 24, "float32", "label column 'digit' holds float32 values, not integer classes"),
])
def test_an_integer_label_column_out_of_range_is_one_line(tmp_path, labels, dtype, words):
    from unet.data.splits import DataError

    folder = write_int_labels(tmp_path / "pq", labels, dtype)
    cfg = tiny(tmp_path / "run", dataset="parquet", data_dir=str(folder), label_column="digit", class_cond=True,
               eval_fraction=0.25, batch_size=4)
    with pytest.raises(DataError) as e:
        load_image_data(cfg, log=lambda *a: None)
    assert str(e.value) == words
