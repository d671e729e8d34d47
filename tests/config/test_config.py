from pathlib import Path

import pytest
from omegaconf import OmegaConf

from attribution.config import ConfigError, config_hash, load_config, save_config
from tests.conftest import ROOT, SMOKE


def test_defaults_and_experiment_layering():
    cfg = load_config(SMOKE)
    assert cfg.name == "toy_smoke"  # experiment file beats its _base_
    assert cfg.world.n_items == 200
    assert cfg.generator.train.lr == 1e-3  # untouched default survives
    assert cfg.world.planted[0].value == "cross"


def test_cli_overrides_win():
    cfg = load_config(SMOKE, ["generator.train.steps=7", "seed=3"])
    assert cfg.generator.train.steps == 7 and cfg.seed == 3


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["generator.train.stpes=7"])
    msg = str(err.value)
    assert "generator.train.stpes" in msg and "generator.train.steps" in msg


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world:\n  n_itemz: 5\n")
    with pytest.raises(ConfigError, match=r"world\.n_itemz.*world\.n_items"):
        load_config(bad)


def test_unknown_key_inside_list_of_structs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world:\n  planted:\n    - {attribute: shape, valeu: cross, count: 2}\n")
    with pytest.raises(ConfigError, match=r"world\.planted\[0\]\.valeu"):
        load_config(bad)


def test_wrong_type_is_clear():
    with pytest.raises(ConfigError, match="generator.train.steps"):
        load_config(SMOKE, ["generator.train.steps=many"])


def test_missing_file_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="ddpm"):
        load_config(SMOKE, ["queries.sampling.sampler=euler"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SMOKE, ["seed"])


def test_resolved_config_roundtrip_and_readonly(tmp_path):
    cfg = load_config(SMOKE, ["seed=5"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert config_hash(again.world) == config_hash(cfg.world)
    from omegaconf.errors import ReadonlyConfigError

    with pytest.raises(ReadonlyConfigError):
        cfg.seed = 6


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiment").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_experiment_config_loads(path: Path):
    # configs over per-machine data name those paths on the command line (their header says so)
    paths = {"coco_generator.yaml": ["world.root=/data/enc", "generator.vae_path=/m/vae",
                                     "text_encoder.name=/m"],
             "coco_own.yaml": ["data.root=/data/coco", "generator.vae_path=/m/vae",
                               "text_encoder.name=/m"],
             "coco_mini.yaml": ["data.root=/data/coco"]}
    assert load_config(path, paths.get(path.name, [])).name
    if path.name in paths:
        with pytest.raises(ConfigError, match="needs"):
            load_config(path)


def test_derive_merges_nested_changes_and_validates():
    from attribution.config import ConfigError, derive, load_config

    cfg = load_config(None, ["generator.train.lr=0.002"])
    d = derive(cfg, {"generator": {"train": {"steps": 7}}, "teacher": {"fisher": "diagonal"}})
    assert d.generator.train.steps == 7 and d.teacher.fisher == "diagonal"
    assert d.generator.train.lr == 0.002 and cfg.generator.train.steps != 7
    with pytest.raises(ConfigError, match="stpes"):
        derive(cfg, {"generator": {"train": {"stpes": 7}}})
    with pytest.raises(ConfigError, match="teacher.fisher"):
        derive(cfg, {"teacher": {"fisher": "full"}})


def test_configuration_reference_is_current():
    """docs/config_reference.md is generated from the schema: regenerating gives the same page,
    and it names every key of the schema."""
    from attribution.config.reference import reference_markdown

    page = (ROOT / "docs" / "config_reference.md").read_text()
    assert page == reference_markdown(), (
        "regenerate: python -m attribution.config.reference > docs/config_reference.md")
    for key in ("teacher.gain", "student.val_queries", "generator.unet.block_out_channels",
                "world.planted[i].value", "abc.fixed_temperatures"):
        assert f"`{key}`" in page, key


# ------------------------------------------------------------------------------ presets
def test_presets_compose_with_experiment_files(tmp_path):
    """``_base_`` takes a list: an experiment file over the toy smoke file and the published
    AbU+ step (``preset:abu_plus_step``), this file's own keys last."""
    from attribution.config import preset_names, read_preset

    assert {"abu_plus_step", "abu_plus", "abu", "paper_student"} <= set(preset_names())
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"_base_: [{SMOKE}, 'preset:abu_plus_step']\nteacher:\n  eta: 0.02\n")
    cfg = load_config(exp)
    assert cfg.name == "toy_smoke" and cfg.world.n_items == 200  # from the first base
    t = cfg.teacher
    assert (t.fisher, t.gain, t.gain_scale, t.damping, t.estimator) == (
        "ekfac", None, "N2", 0.1, "ascent")
    assert t.eta == 0.02  # the file itself wins
    full = read_preset("abu_plus")["teacher"]  # its own _base_ chain resolved
    assert full["gain_scale"] == "N2" and full["captions"] == 5 and full["flips"] is True
    assert len(full["timesteps"]) == 20 and full["query_draws"] == 50000
    assert read_preset("abu")["teacher"]["fisher"] == "diagonal"
    assert read_preset("abu")["teacher"]["gain_scale"] == "N"
    student = read_preset("paper_student")["student"]
    assert (student["head"], student["hidden"], student["loss"], student["select"]) == (
        "mlp", [768] * 4, "ce", "last")


def test_bad_bases_are_clear(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("_base_: b.yaml\n")
    b.write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="its own _base_"):
        load_config(a)
    a.write_text("_base_: 'preset:abu_pluss'\n")
    with pytest.raises(ConfigError, match="No preset 'abu_pluss'.*abu_plus"):
        load_config(a)
    a.write_text("_base_: [3]\n")
    with pytest.raises(ConfigError, match="_base_ must be"):
        load_config(a)


def test_the_published_gain_is_n_squared(tmp_path):
    """Known answer: the preset's step is the formula's — gain N² for AbU+ (N for AbU)."""
    from attribution.teacher.run import teacher_gain

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"_base_: [{SMOKE}, 'preset:abu_plus_step']\n")
    assert teacher_gain(load_config(exp).teacher, 1200) == 1200.0 ** 2
    assert teacher_gain(load_config(SMOKE).teacher, 1200) == 1200.0
    assert teacher_gain(load_config(SMOKE, ["teacher.gain=7"]).teacher, 1200) == 7.0


def test_free_mappings_take_any_name_but_only_strings():
    """``features.weights`` / ``features.arch`` map extractor names to files / model names
    (docs/scale.md's ``features.weights.dino=...``)."""
    cfg = load_config(None, ["features.weights.dino=/models/dino.pth",
                             "features.arch={clip: ViT-B-32}"])
    assert cfg.features.weights == {"dino": "/models/dino.pth"}
    assert cfg.features.arch == {"clip": "ViT-B-32"}
    with pytest.raises(ConfigError, match="features.weights.dino"):
        load_config(None, ["features.weights.dino=[1,2]"])


def test_k_val_is_checked_against_k_or_derived_from_it():
    from attribution.config import validation_k

    assert validation_k(None, [500, 1000], 1000) == 100  # K / 10 below the smallest k_eval
    assert validation_k(None, [500, 1000], 10000) == 500
    assert validation_k(None, [10, 50], 200) == 10
    assert validation_k(40, [10], 100) == 40
    with pytest.raises(ConfigError, match="more than half"):
        validation_k(501, [500], 1000)
    with pytest.raises(ConfigError, match="student.k_val"):  # toy configs: at load
        load_config(SMOKE, ["student.k_val=30"])  # K = teacher.k = 50


def test_second_teacher_settings_are_checked_at_load():
    from attribution.config import second_teacher_config

    cfg = load_config(SMOKE, ["second_teacher.enabled=true"])
    second = second_teacher_config(cfg)
    assert second.teacher.gain_scale == "N2" and second.teacher.estimator == "ascent"
    assert second.teacher.timesteps == cfg.teacher.timesteps  # the world's measurement kept
    with pytest.raises(ConfigError, match="second_teacher.*captions"):  # 5 captions > 3
        load_config(SMOKE, ["second_teacher.enabled=true", "second_teacher.preset=abu_plus"])
    with pytest.raises(ConfigError, match="second_teacher.*teacher.estimater"):
        load_config(SMOKE, ["second_teacher.enabled=true",
                            "second_teacher.teacher={estimater: quadratic}"])


def test_fisher_precision_keys_only_the_fisher_and_what_reads_it():
    """fp32 keeps every key a Fisher had before the setting; bf16 is another Fisher (and so
    another teacher), refused for the diagonal Fisher and fp16 off CUDA."""
    from attribution.pipeline import Pipeline

    base = Pipeline(load_config(SMOKE, []))
    same = Pipeline(load_config(SMOKE, ["teacher.fisher_precision=fp32"]))
    bf16 = Pipeline(load_config(SMOKE, ["teacher.fisher_precision=bf16"]))
    assert base.key("fisher") == same.key("fisher") and base.key("teacher") == same.key("teacher")
    assert bf16.key("fisher") != base.key("fisher") and bf16.key("teacher") != base.key("teacher")
    assert bf16.key("generator") == base.key("generator")
    with pytest.raises(ConfigError, match="EK-FAC"):
        load_config(SMOKE, ["teacher.fisher=diagonal", "teacher.fisher_precision=bf16"])
    with pytest.raises(ConfigError, match="device=cuda"):
        load_config(SMOKE, ["teacher.fisher_precision=fp16", "device=cpu"])


def test_a_setting_added_at_its_neutral_value_leaves_sweep_rows_current():
    """A sweep row hashed before teacher.fisher_precision existed (the config without it) is
    still this config's; a reduced precision is another configuration."""
    from attribution.config import FORMAT_VERSION, derive, run_hash, to_dict

    cfg = load_config(SMOKE, [])
    before = to_dict(cfg)
    before["teacher"].pop("fisher_precision")
    assert run_hash(cfg) == config_hash(FORMAT_VERSION, before)
    assert run_hash(derive(cfg, {"teacher": {"fisher_precision": "bf16"}})) != run_hash(cfg)
