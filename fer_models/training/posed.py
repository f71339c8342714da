"""The fixed, subject-disjoint split of the posed sets (CK+48, JAFFE) into auxiliary training and held-out subjects.

CK+48 and JAFFE may be trained on only through this split, written down (docs/posed_split.md and
``posed_split.json`` beside this file) before any model was trained with them, and never changed after seeing a
result: a subject is either a training subject (all its images may be trained on) or a held-out subject (none
of its images is ever trained on; they form the CK+ and JAFFE evaluation rows of the protocol, crops and full
frames). The split is drawn once from sorted subject ids with ``numpy.random.default_rng(SPLIT_SEED)``:
70% of the 118 CK+48 subjects and 6 of the 10 JAFFE subjects train. ``posed_split.json`` is the authority; the
code that drew it is :func:`draw_split`, kept so anyone can check it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

SPLIT_SEED = 20261202
SPLIT_FILE = Path(__file__).with_name("posed_split.json")
CKPLUS_TRAIN_SHARE = 0.7
JAFFE_TRAIN_SUBJECTS = 6


def ckplus_subject(file_name: str) -> str:
    """``S005_001_00000011.png`` -> ``S005``."""
    m = re.match(r"(S\d+)_", Path(file_name).name)
    if not m:
        raise ValueError(f"{file_name}: not a CK+ file name (S<subject>_<sequence>_<frame>)")
    return m.group(1)


def jaffe_subject(file_name: str) -> str:
    """``KA.AN1.39.tiff`` -> ``KA``."""
    name = Path(file_name).name
    if "." not in name:
        raise ValueError(f"{file_name}: not a JAFFE file name (<subject>.<expression><n>.<id>)")
    return name.split(".", 1)[0]


def draw_split(subjects: Sequence[str], n_train: int, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """``{"train": [...], "heldout": [...]}``: ``n_train`` subjects drawn from the sorted ids with ``seed``."""
    ids = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(ids))
    train = sorted(ids[i] for i in order[:n_train])
    return {"train": train, "heldout": sorted(set(ids) - set(train))}


def draw_all(data_root: Path) -> dict:
    """Draw both splits from the files under ``data_root`` (what wrote ``posed_split.json``)."""
    root = Path(data_root)
    ck = [ckplus_subject(f.name) for f in (root / "ckplus48").glob("*/*.png")]
    jf = [jaffe_subject(f.name) for f in (root / "jaffe" / "crops").glob("*/*")]
    n_ck = len(set(ck))
    return {"seed": SPLIT_SEED,
            "ckplus48": draw_split(ck, int(round(CKPLUS_TRAIN_SHARE * n_ck))),
            "jaffe": draw_split(jf, JAFFE_TRAIN_SUBJECTS)}


def load_split() -> dict:
    return json.loads(SPLIT_FILE.read_text())


def subject_mask(subjects: Sequence[str], dataset: str, part: str) -> np.ndarray:
    """Boolean mask of the images whose subject is in ``part`` ("train" or "heldout") of ``dataset``'s split.

    A subject the split does not know is refused: new data needs a new, written-down split, not a silent guess.
    """
    split = load_split()[dataset]
    known = set(split["train"]) | set(split["heldout"])
    unknown = sorted(set(subjects) - known)
    if unknown:
        raise ValueError(f"{dataset}: subjects {unknown[:5]} are in neither part of the fixed split")
    wanted = set(split[part])
    return np.array([s in wanted for s in subjects], bool)


POSED_SETS = ("ckplus48", "jaffe")


def posed_training_faces(data_root: Path, class_names: Sequence[str], sets: Sequence[str] = POSED_SETS,
                         input_size: int = 48) -> "FaceData":
    """The *training* subjects' images of the posed sets as grey ``input_size`` faces labelled in ``class_names``'
    order (classes the model lacks, such as CK+'s contempt, are left out). Never a held-out subject's image."""
    from ..models.preprocess import faces_to_uint8
    from .data import FaceData, load_dataset
    from .protocol import read_jaffe

    root = Path(data_root)
    root = root.parent if root.name == "fer2013" or root.is_file() else root
    images, labels, sources = [], [], []
    for name in sets:
        if name == "ckplus48":
            ck = load_dataset(root / "ckplus48", kind="ckplus")
            keep = subject_mask(ck.subjects, "ckplus48", "train") & np.isin(
                np.array(ck.class_names)[ck.labels], list(class_names))
            faces = ck.images[keep]
            if faces.shape[-1] != input_size:
                faces = faces_to_uint8(list(faces), input_size, 1).numpy()[:, 0]
            images.append(faces)
            labels.append([list(class_names).index(ck.class_names[l]) for l in ck.labels[keep]])
            sources += [f"ckplus48/{s}" for s in ck.sources[keep]]
        elif name == "jaffe":
            photos = read_jaffe(root, "crops", class_names)
            keep = subject_mask([jaffe_subject(n) for n in photos.names], "jaffe", "train")
            picked = [im for im, k in zip(photos.images, keep) if k]
            images.append(faces_to_uint8(picked, input_size, 1).numpy()[:, 0])
            labels.append(photos.labels[keep].tolist())
            sources += [f"jaffe/{n}" for n, k in zip(photos.names, keep) if k]
        else:
            raise ValueError(f"unknown posed set {name!r}; choose from {POSED_SETS}")
    y = np.concatenate([np.asarray(l, np.int64) for l in labels])
    return FaceData(np.concatenate(images), y, list(class_names), np.array(["Training"] * len(y)),
                    sources=np.array(sources), name="+".join(sets))
