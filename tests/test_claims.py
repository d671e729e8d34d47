"""The claims table on sweep rows with known answers: each verdict follows from the numbers."""

from attribution.claims import (
    FAILS,
    HOLDS,
    TIED,
    budget_claims,
    check_claims,
    feature_space_claims,
    format_claims,
    loss_claims,
    outside_p_claims,
    scaling_claims,
    stale_runs,
)

M = "student.mAP@10"


def _rows(key, pairs):
    return [{key: str(x), M: str(m), f"{M}_stderr": str(se)} for x, m, se in pairs]


def test_loss_claims_follow_the_numbers():
    rows = _rows("student.loss", [("ce", 0.40, 0.01), ("mse", 0.20, 0.01),
                                  ("ordinal", 0.41, 0.01), ("listwise", 0.45, 0.01)])
    mse, same = loss_claims(rows, M)
    assert mse["verdict"] == HOLDS and "ce 0.400" in mse["ours"]  # the next worst is ce
    assert same["verdict"].startswith(HOLDS)  # 0.01 apart, s.e. of the difference 0.014
    rows = _rows("student.loss", [("ce", 0.40, 0.01), ("mse", 0.45, 0.01),
                                  ("ordinal", 0.30, 0.01)])
    mse, same = loss_claims(rows, M)
    assert mse["verdict"] == FAILS and same["verdict"] == FAILS


def test_a_difference_inside_two_standard_errors_cannot_be_told_apart():
    rows = _rows("student.loss", [("ce", 0.40, 0.05), ("mse", 0.35, 0.05)])
    assert loss_claims(rows, M)[0]["verdict"] == TIED  # 0.05 < 2 x 0.071


def test_scaling_rises_then_saturates():
    rows = _rows("student.n_queries", [(10, 0.20, 0.01), (30, 0.40, 0.01), (100, 0.50, 0.01),
                                       (300, 0.52, 0.01), (990, 0.53, 0.01)])
    rise, sat = scaling_claims(rows, M)
    assert rise["verdict"] == HOLDS and sat["verdict"] == HOLDS
    linear = _rows("student.n_queries", [(10, 0.1, 0.01), (20, 0.2, 0.01), (40, 0.3, 0.01)])
    assert scaling_claims(linear, M)[1]["verdict"] == TIED  # the same gain per doubling


def test_outside_p_uses_the_smallest_positive_p_not_the_best():
    rows = _rows("student.p_outside", [(0.0, 0.40, 0.01), (0.05, 0.38, 0.01), (0.1, 0.60, 0.01),
                                       (0.4, 0.30, 0.01)])
    helps, hurts = outside_p_claims(rows, M)
    assert helps["verdict"] == TIED and "p=0.05" in helps["ours"]  # -0.02 ± 0.014
    assert hurts["verdict"] == HOLDS


def test_feature_space_and_budget_claims():
    rows = [{"student.feature": "a", M: "0.5", f"{M}_stderr": "0.01",
             "baseline.a.mAP@10": "0.3", "baseline.a.mAP@10_stderr": "0.01"},
            {"student.feature": "b", M: "0.3", f"{M}_stderr": "0.01",
             "baseline.b.mAP@10": "0.4", "baseline.b.mAP@10_stderr": "0.01"}]
    a, b = feature_space_claims(rows, M)
    assert a["verdict"] == HOLDS and "0.300 → 0.500" in a["ours"] and b["verdict"] == FAILS
    budget = _rows("student.n_queries", [(495, 0.30, 0.01), (990, 0.40, 0.01)])
    assert budget_claims(budget, M)[0]["verdict"].startswith("more queries")


def test_check_claims_reads_only_the_experiments_rows(tmp_path):
    d = tmp_path / "loss"
    d.mkdir()
    (d / "results.csv").write_text(
        f"run,experiment,student.loss,{M},{M}_stderr\n"
        f"a,mine,ce,0.4,0.01\nb,mine,mse,0.2,0.01\nc,other,mse,0.9,0.01\n")
    claims = check_claims(tmp_path, "mine", M)
    assert [c["verdict"] for c in claims] == [HOLDS]
    assert check_claims(tmp_path, "nobody", M) == []
    table = format_claims(claims, M)
    assert table[0].startswith("| claim") and "MSE trains worst" in table[2]


def test_claims_are_judged_against_each_teacher_side_by_side(tmp_path):
    """Known answer: MSE trains worst against the run's teacher and best against the second
    one; the table gives each teacher's figure and verdict on the same row."""
    d = tmp_path / "loss"
    d.mkdir()
    (d / "results.csv").write_text(
        f"run,experiment,student.loss,{M},{M}_stderr,second.{M},second.{M}_stderr\n"
        f"a,mine,ce,0.4,0.01,0.2,0.01\nb,mine,mse,0.2,0.01,0.4,0.01\n")
    first, second = check_claims(tmp_path, "mine", M), check_claims(tmp_path, "mine", "second." + M)
    assert [c["verdict"] for c in first] == [HOLDS]
    assert [c["verdict"] for c in second] == [FAILS]
    table = format_claims(first, M, second, "published AbU+")
    assert "against published AbU+" in table[0]
    row = table[2].split(" | ")
    assert row[3] == HOLDS and row[5].rstrip(" |") == FAILS


def test_paired_differences_separate_what_unpaired_ones_cannot(tmp_path):
    """Two losses 0.02 apart on every one of 50 very different queries: unpaired, their
    standard errors (~0.04 each) hide it; paired over queries it is exact."""
    import numpy as np

    from attribution.common.files import atomic_save_npz
    from attribution.sweep_spec import ap_file

    base = np.linspace(0.1, 0.9, 50)
    runs = {"ce": base + 0.02, "mse": base}
    d = tmp_path / "loss"
    d.mkdir()
    lines = [f"run,experiment,student.loss,{M},{M}_stderr"]
    for loss, ap in runs.items():
        se = ap.std(ddof=1) / np.sqrt(len(ap))
        lines.append(f"student.loss={loss},mine,{loss},{ap.mean()},{se}")
    (d / "results.csv").write_text("\n".join(lines) + "\n")
    unpaired = check_claims(tmp_path, "mine", M)[0]
    assert unpaired["verdict"] == TIED and "unpaired" in unpaired["ours"]
    for loss, ap in runs.items():
        path = ap_file(d, "mine", f"student.loss={loss}")
        path.parent.mkdir(exist_ok=True)
        atomic_save_npz(path, **{"student@10": ap})
    paired = check_claims(tmp_path, "mine", M)[0]
    assert paired["verdict"] == HOLDS and "+0.020 ± 0.000" in paired["ours"]
    # a file that belongs to another run (its mean is not the table's) is not used
    atomic_save_npz(ap_file(d, "mine", "student.loss=ce"), **{"student@10": base + 0.5})
    assert "unpaired" in check_claims(tmp_path, "mine", M)[0]["ours"]


def test_rows_run_under_another_configuration_are_stale(tmp_path):
    d = tmp_path / "loss"
    d.mkdir()
    (d / "results.csv").write_text(
        f"run,experiment,config,student.loss,{M},{M}_stderr\n"
        f"student.loss=ce,mine,aaa,ce,0.4,0.01\nstudent.loss=mse,mine,old,mse,0.2,0.01\n"
        f"student.loss=mse,other,old,mse,0.9,0.01\n")
    now = {"student.loss=ce": "aaa", "student.loss=mse": "bbb"}
    assert stale_runs(tmp_path, "mine", now.get) == {"loss": ["student.loss=mse"]}
    assert stale_runs(tmp_path, "mine", lambda run: None) == {}  # unknown is never stale
    assert stale_runs(tmp_path, "nobody", now.get) == {}


def test_the_report_knows_the_key_a_sweep_run_would_have_now(tmp_path):
    """The report's expected key for a run id is the key `attribution sweep` gives that run
    (load_config with the settings as overrides), lists with commas included; a changed
    default makes an older row's key differ."""
    from attribution.config import load_config, run_hash
    from attribution.report import _current_key
    from attribution.sweep_spec import run_dotlist

    path = "configs/experiment/toy_smoke.yaml"
    base = [f"output_root={tmp_path}"]
    cfg = load_config(path, base)
    for run in ("student.loss=mse", "student.hidden=[64, 64],student.p_outside=0.2"):
        assert run_dotlist(run) == run.replace(",student", "\nstudent").splitlines()
        sweep_key = run_hash(load_config(path, base + run.replace(",student", "\nstudent")
                                         .splitlines()))
        assert _current_key(cfg, run) == sweep_key
    changed = load_config(path, base + ["student.anchor=0.05"])
    assert _current_key(changed, "student.loss=mse") != _current_key(cfg, "student.loss=mse")
    assert _current_key(cfg, "student.no_such_key=1") is None


def test_a_row_s_hash_carries_the_format_version(tmp_path, monkeypatch):
    """A row hashed by another format version of this project (other defaults, other stage
    meanings) is not the row the report expects now: it is stale."""
    import attribution.config.load as load
    from attribution.config import load_config, run_hash

    cfg = load_config("configs/experiment/toy_smoke.yaml", [f"output_root={tmp_path}"])
    now = run_hash(cfg)
    monkeypatch.setattr(load, "FORMAT_VERSION", load.FORMAT_VERSION - 1)
    assert run_hash(cfg) != now
