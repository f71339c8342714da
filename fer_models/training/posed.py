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
