"""Bad released data: rankings that would run code, ragged or fractional ranks, bad features.

Every case is ONE clear error line (exit code 2) that names the key or the file, before any
stage spends work, and no traceback.  The cases run through ``attribution.cli.main`` in-process
(a traceback would be an exception escaping ``main`` and fail the test).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, Exploit, assert_clear, run_cli

COCO = ROOT / "configs" / "experiment" / "coco_released.yaml"


# ---------------------------------------------------------------------------- released data
@pytest.fixture()
def released(tmp_path):
    from tests.data.test_released import write_released_fixture

    return write_released_fixture(tmp_path / "data", n_items=60, q_train=10, k=12, q_test=3)


def _coco(root: Path, tmp_path: Path) -> list[str]:
    return ["student", COCO, f"data.root={root}", f"output_root={tmp_path / 'runs'}",
            "student.epochs=1", "student.hidden=[8]", "student.k_eval=[5]", "student.logger=none",
            "student.num_workers=0", "student.queries_per_batch=4", "student.pairs_per_query=4",
            "--no-progress"]


def _pickle(path: Path, payload) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=4))


def _train_rank(root: Path) -> np.ndarray:
    with open(root / "influence_train.pkl", "rb") as f:
        return pickle.load(f)["random"]["rank"]  # our own fixture: trusted


@pytest.mark.parametrize("case", ["exploit", "exploit-nested", "ragged", "float-fraction",
                                  "strings", "not-a-dict", "no-random", "truncated", "empty",
                                  "text", "1-d", "out-of-range", "repeated-id", "no-rows",
                                  "nan-scores"])
def test_bad_released_rankings(capsys, tmp_path, released, case):
    path = released / "influence_train.pkl"
    marker = tmp_path / "pwned"
    rank = _train_rank(released)
    payloads = {
        "exploit": Exploit(marker),
        "exploit-nested": {"random": {"rank": rank, "extra": Exploit(marker)}},
        "ragged": {"random": {"rank": [list(r) for r in rank[:3]] + [list(rank[3][:4])]}},
        "float-fraction": {"random": {"rank": np.random.default_rng(0).random(rank.shape)}},
        "strings": {"random": {"rank": np.array([["a"] * 12] * 10)}},
        "not-a-dict": [1, 2, 3],
        "no-random": {"other": {"rank": rank}},
        "1-d": {"random": {"rank": rank[0]}},
        "out-of-range": {"random": {"rank": rank + 1000}},
        "repeated-id": {"random": {"rank": np.zeros_like(rank)}},
        "no-rows": {"random": {"rank": rank[:0]}},
        "nan-scores": {"random": {"rank": rank, "influence_subset": np.where(
            np.arange(rank.size).reshape(rank.shape) == 7, np.nan, 1.0)}},
    }
    if case in payloads:
        _pickle(path, payloads[case])
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif case == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("rank: 1 2 3\n")
    code, _, err = run_cli(capsys, *_coco(released, tmp_path))
    assert_clear(code, err, "influence_train.pkl")
    assert not marker.exists(), "a crafted pickle ran code"


def test_released_whole_number_float_ranks_are_accepted(tmp_path, released):
    """Whole-number floats are item ids written as floats: converted, not refused."""
    from attribution.student.data import load_rankings

    rank = _train_rank(released)
    _pickle(released / "influence_train.pkl", {"random": {"rank": rank.astype(np.float64)}})
    assert np.array_equal(load_rankings(released, 60).train, rank)


@pytest.mark.parametrize("case", ["nan", "truncated", "int", "1-d", "wrong-dim"])
def test_bad_released_features(capsys, tmp_path, released, case):
    path = released / "feats" / "dino+clip_text" / "data_feats.npy"
    arr = np.load(path)
    if case == "nan":
        arr[3, 1] = np.nan
        np.save(path, arr)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "int":
        np.save(path, arr.astype(np.int32))
    elif case == "1-d":
        np.save(path, arr[:, 0])
    else:
        np.save(path, arr[:, :-1])
    code, _, err = run_cli(capsys, *_coco(released, tmp_path))
    assert_clear(code, err, "data_feats" if case != "wrong-dim" else "dino+clip_text")


def test_released_root_missing(capsys, tmp_path):
    code, _, err = run_cli(capsys, *_coco(tmp_path / "nowhere", tmp_path))
    assert_clear(code, err, "nowhere")




def test_safe_unpickler_admits_arrays_and_containers(tmp_path):
    from attribution.common.files import safe_pickle_load

    payload = {"random": {"rank": np.arange(6).reshape(2, 3), "f": np.float32(1.5),
                          "list": [1, 2.0, "x", (3, None)], "o": np.array([1, "a"], object)}}
    path = tmp_path / "ok.pkl"
    for protocol in (2, 4, 5):
        _pickle(path, payload) if protocol == 4 else path.write_bytes(
            pickle.dumps(payload, protocol=protocol))
        back = safe_pickle_load(path)
        assert np.array_equal(back["random"]["rank"], payload["random"]["rank"])
        assert back["random"]["list"] == payload["random"]["list"]
