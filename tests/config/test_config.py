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
                                     "text_encoder.name=/m"]}
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
