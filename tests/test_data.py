"""Readers on small synthetic files, good and malformed; real-data split sizes when FER_DATA_DIR is set."""
import gzip

import numpy as np
import pytest
from PIL import Image

from fer_models.training.data import DataFormatError, load_dataset, read_ckplus, read_fer2013_csv, read_image_folder


def _csv_rows(n=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        px = " ".join(map(str, rng.integers(0, 256, 2304)))
        rows.append(f"{i % 7},\"{px}\",{['Training', 'PublicTest', 'PrivateTest'][i % 3]}")
    return rows


def _write(path, lines, gz=False):
    text = "\n".join(lines) + ("\n" if lines else "")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_csv_reader(tmp_path, gz):
    path = _write(tmp_path / ("f.csv.gz" if gz else "f.csv"), ["emotion,pixels,Usage"] + _csv_rows(6), gz)
    d = read_fer2013_csv(path)
    assert d.images.shape == (6, 48, 48) and d.images.dtype == np.uint8
    assert d.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert d.split.tolist()[:3] == ["Training", "PublicTest", "PrivateTest"]
    assert len(d.get_split("PublicTest")) == 2
    assert load_dataset(path, cache=False).images.shape == (6, 48, 48)


def test_csv_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path / "f.csv", ["emotion,pixels,Usage"] + _csv_rows(4))
    a = load_dataset(path)
    assert list((tmp_path / "cache").iterdir())
    b = load_dataset(path)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.split, b.split)


@pytest.mark.parametrize("lines, message", [
    (["emotion,Usage", "0,Training"], r"missing column\(s\) \['pixels'\]"),
    (["emotion,pixels,Usage", "0,\"1 2 3\",Training"], r"row 2: 3 pixel values, expected 2304"),
    (["emotion,pixels,Usage", "9,\"" + " ".join(["1"] * 2304) + "\",Training"], r"row 2: emotion 9 outside 0..6"),
    (["emotion,pixels,Usage", "x,\"" + " ".join(["1"] * 2304) + "\",Training"], r"row 2: emotion 'x'"),
    (["emotion,pixels,Usage", "1,\"" + " ".join(["300"] * 2304) + "\",Training"], r"row 2: pixel values outside"),
    (["emotion,pixels,Usage", "1,\"" + " ".join(["3"] * 2304) + "\",Validation"], r"row 2: Usage 'Validation'"),
    ([], r"empty file"),
])
def test_csv_malformed(tmp_path, lines, message):
    path = _write(tmp_path / "bad.csv", lines)
    with pytest.raises(DataFormatError, match=message) as e:
        read_fer2013_csv(path)
    assert "bad.csv" in str(e.value)


def _folder(tmp_path, classes=("angry", "happy")):
    rng = np.random.default_rng(0)
    for sub, names in (("train", ["Training_1.jpg", "Training_2.jpg"]),
                       ("test", ["PublicTest_3.jpg", "PrivateTest_4.jpg"])):
        for c in classes:
            (tmp_path / sub / c).mkdir(parents=True, exist_ok=True)
            for n in names:
                Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(tmp_path / sub / c / n)
    return tmp_path


def test_image_folder_reader(tmp_path):
    d = read_image_folder(_folder(tmp_path))
    assert len(d) == 8
    assert sorted(set(d.split.tolist())) == ["PrivateTest", "PublicTest", "Training"]
    assert (d.split == "Training").sum() == 4
    assert set(d.labels.tolist()) == {0, 3}  # angry, happy in FER2013 order
    assert load_dataset(tmp_path).images.shape == (8, 48, 48)


def test_image_folder_unknown_class_and_unreadable_image(tmp_path):
    root = _folder(tmp_path)
    (root / "train" / "bored").mkdir()
    with pytest.raises(DataFormatError, match="unknown class folder 'bored'"):
        read_image_folder(root)
    (root / "train" / "bored").rmdir()
    (root / "train" / "angry" / "Training_9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataFormatError, match="cannot read image .*Training_9.jpg"):
        read_image_folder(root)


def test_ckplus_reader(tmp_path):
    for c, names in (("happy", ["S005_001_00000011.png", "S005_001_00000012.png"]), ("contempt", ["S010_002_00000014.png"])):
        (tmp_path / c).mkdir()
        for n in names:
            Image.fromarray(np.full((48, 48), 128, np.uint8)).save(tmp_path / c / n)
    d = read_ckplus(tmp_path)
    assert len(d) == 3 and d.subjects.tolist() == ["S010", "S005", "S005"]
    assert d.class_names[d.labels[0]] == "contempt"
    sub = d.subset([1, 2])  # per-face extras (the sequence ids) follow the subset, like subjects
    assert sub.subjects.tolist() == ["S005", "S005"] and len(sub.extra["sequences"]) == 2
    assert sub.extra["sequences"].tolist() == d.extra["sequences"][[1, 2]].tolist()
    (tmp_path / "happy" / "face.png").write_bytes(b"")
    with pytest.raises(DataFormatError, match="face.png"):
        read_ckplus(tmp_path)


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        load_dataset("/nonexistent/fer2013.csv")


# --- real data (skipped without FER_DATA_DIR) -------------------------------------------------------------
def test_real_fer2013_split_sizes(data_dir):
    d = load_dataset(data_dir)
    assert d.images.shape[1:] == (48, 48)
    assert [(d.split == s).sum() for s in ("Training", "PublicTest", "PrivateTest")] == [28709, 3589, 3589]
    assert d.class_counts()[1] == 547  # disgust, all splits
    assert (d.labels[d.split == "Training"] == 1).sum() == 436


def test_real_ckplus_size(data_dir):
    d = load_dataset(data_dir / "ckplus48", kind="ckplus")
    assert len(d) == 981
    assert len(set(d.subjects.tolist())) == 118
