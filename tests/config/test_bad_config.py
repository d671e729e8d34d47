"""Bad config values, config files and sweep files, as a new user would give them.

Every case is ONE clear error line (exit code 2) that names the key or the file, before any
stage spends work, and no traceback.  The cases run through ``attribution.cli.main`` in-process
(a traceback would be an exception escaping ``main`` and fail the test).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, SMOKE, assert_clear, run_cli

COCO = ROOT / "configs" / "experiment" / "coco_released.yaml"


# ------------------------------------------------------------------------- config: one key
CONFIG_CASES = [
    # (override(s), what the message must name)
    (["student.queries_per_batch=0"], "student.queries_per_batch"),
    (["teacher.k=0"], "teacher.k"),
    (["student.epochs=0"], "student.epochs"),
    (["student.pairs_per_query=0"], "student.pairs_per_query"),
    (["queries.n_test=0"], "queries.n_test"),
    (["queries.n_train=0"], "queries.n_train"),
    (["student.k_eval=[0]"], "student.k_eval"),
    (["student.k_eval=[]"], "student.k_eval"),
    (["student.k_eval=[500]"], "student.k_eval"),
    (["student.m=0"], "student.m"),
    (["student.lr=-1"], "student.lr"),
    (["student.lr=nan"], "student.lr"),
    (["student.lr=inf"], "student.lr"),
    (["teacher.eta=-1"], "teacher.eta"),
    (["teacher.eta=0"], "teacher.eta"),
    (["teacher.gain=0"], "teacher.gain"),
    (["teacher.damping=-1"], "teacher.damping"),
    (["teacher.query_draws=0"], "teacher.query_draws"),
    (["teacher.query_batch_size=0"], "teacher.query_batch_size"),
    (["teacher.fisher_epochs=0"], "teacher.fisher_epochs"),
    (["teacher.timesteps=[]"], "teacher.timesteps"),
    (["teacher.timesteps=[-1]"], "teacher.timesteps"),
    (["teacher.timesteps=[1000]"], "teacher.timesteps"),
    (["teacher.captions=0"], "teacher.captions"),
    (["teacher.captions=9"], "teacher.captions"),
    (["teacher.k=201"], "teacher.k"),
    (["teacher.fisher=full"], "teacher.fisher"),
    (["teacher.params=everything"], "teacher.params"),
    (["teacher.curation=clip"], "teacher.curation"),
    (["teacher.devices=0"], "teacher.devices"),
    (["teacher.strategy=fsdp"], "teacher.strategy"),
    (["student.hidden=[-5]"], "student.hidden"),
    (["student.hidden=[]"], "student.hidden"),
    (["student.dropout=1"], "student.dropout"),
    (["student.p_outside=1"], "student.p_outside"),
    (["student.p_outside=-0.1"], "student.p_outside"),
    (["student.alpha_init=0"], "student.alpha_init"),
    (["student.loss=hinge"], "student.loss"),
    (["student.ordinal_bins=1"], "student.ordinal_bins"),
    (["student.listwise_temperature=0"], "student.listwise_temperature"),
    (["student.m=51"], "student.m"),
    (["student.n_queries=9"], "student.n_queries"),
    (["student.m=5", "student.budget=100"], "student.budget"),
    (["student.budget=1"], "student.budget"),
    (["student.num_workers=-1"], "student.num_workers"),
    (["student.logger=tensorboard"], "student.logger"),
    (["student.index=annoy"], "student.index"),
    (["student.rerank=-1"], "student.rerank"),
    (["student.devices=3"], "student.queries_per_batch"),
    (["student.seed=-1"], "student.seed"),
    (["student.feature=dino"], "student.feature"),
    (["world.image_size=3"], "world.image_size"),
    (["world.image_size=17"], "world.image_size"),
    (["world.n_items=1"], "world.n_items"),
    (["world.captions_per_item=0"], "world.captions_per_item"),
    (["world.zipf=-1"], "world.zipf"),
    (["world.kind=folder"], "world.root"),
    (["world.kind=lake"], "world.kind"),
    (["world.planted=[{attribute: shape, value: purple, count: 3}]"], "world.planted[0].value"),
    (["world.planted=[{attribute: smell, value: cross, count: 3}]"], "world.planted[0].attribute"),
    (["world.planted=[{attribute: shape, value: cross, count: 0}]"], "world.planted[0].count"),
    (["world.planted=[{attribute: shape, value: cross, count: 500}]"], "world.planted[0].count"),
    (["generator.train.ema_decay=2"], "generator.train.ema_decay"),
    (["generator.train.cfg_dropout=1"], "generator.train.cfg_dropout"),
    (["generator.train.steps=0"], "generator.train.steps"),
    (["generator.train.lr=0"], "generator.train.lr"),
    (["generator.train.warmup_steps=-1"], "generator.train.warmup_steps"),
    (["generator.train.lr_schedule=step"], "generator.train.lr_schedule"),
    (["generator.num_train_timesteps=1"], "generator.num_train_timesteps"),
    (["generator.beta_end=0.00001"], "generator.beta_end"),
    (["generator.beta_schedule=cosine"], "generator.beta_schedule"),
    (["generator.codec=vae"], "generator.vae_path"),
    (["generator.weights=a.bin", "generator.pretrained=b"], "generator.pretrained"),
    (["generator.unet.block_out_channels=[]"], "generator.unet.block_out_channels"),
    (["generator.unet.norm_num_groups=7"], "generator.unet.norm_num_groups"),
    (["generator.unet.down_block_types=[Foo2D,CrossAttnDownBlock2D]"],
     "generator.unet.down_block_types"),
    (["generator.unet.block_out_channels=[16,32,32]"], "block_out_channels"),
    (["queries.sampling.steps=0"], "queries.sampling.steps"),
    (["queries.sampling.steps=5000"], "queries.sampling.steps"),
    (["queries.sampling.sampler=euler"], "queries.sampling.sampler"),
    (["queries.sampling.guidance=-1"], "queries.sampling.guidance"),
    (["queries.planted_test=-1"], "queries.planted_test"),
    (["queries.planted_test=4"], "queries.planted_test"),
    (["features.spaces=[pixels,foo]"], "features.spaces"),
    (["features.spaces=[]"], "features.spaces"),
    (["features.spaces=[pixels,pixels]"], "features.spaces"),
    (["features.spaces=[pixels+pixels]"], "features.spaces"),
    (["features.batch_size=0"], "features.batch_size"),
    (["features.toyclip_lr=0"], "features.toyclip_lr"),
    (["baselines.dtrak_timesteps=[2000]"], "baselines.dtrak_timesteps"),
    (["baselines.dtrak_proj_dim=0"], "baselines.dtrak_proj_dim"),
    (["fidelity.n_samples=1"], "fidelity.n_samples"),
    (["text_encoder.max_length=0"], "text_encoder.max_length"),
    (["data.source=s3"], "data.source"),
    (["device=tpu"], "device"),
    (["seed=-1"], "seed"),
    (["name=../evil"], "name"),
    (["name=a/b"], "name"),
    (["abc.exemplars=9"], "abc.exemplars"),
    (["abc.calibration_concepts=4"], "abc.calibration_concepts"),
    (["abc.teacher_images=9"], "abc.teacher_images"),
    (["abc.fixed_temperatures=[0]"], "abc.fixed_temperatures"),
    (["abc.k=[0]"], "abc.k"),
    (["abc.mapper=transformer"], "abc.mapper"),
    (["abc.spaces=[dino]"], "abc.spaces"),
    (["student.epochs=many"], "student.epochs"),
    (["student.epocs=3"], "student.epochs"),  # unknown key: names the close match
    (["seed"], "key=value"),
    (["=5"], "key=value"),
    (["student.k_eval=[1,"], "student.k_eval=[1,"),  # a broken list: yaml's parser error
    (["name=${name}"], "name"),  # an override that refers to itself
    (["seed=18446744073709551616"], "seed"),  # 2**64
    (["world.n_items=99999999999999999999999"], "world.n_items"),
    (["student.k_val=30"], "student.k_val"),  # more than half of K = 50
    (["student.val_scope=everything"], "student.val_scope"),
    (["student.select=first"], "student.select"),
    (["student.select=last", "student.patience=2"], "student.patience"),
    (["teacher.gain_scale=N3"], "teacher.gain_scale"),
    (["teacher.fisher_items=0"], "teacher.fisher_items"),
    (["teacher.timeout_hours=0"], "teacher.timeout_hours"),
    (["features.weights.dino=[1,2]"], "features.weights.dino"),
    (["second_teacher.enabled=true", "second_teacher.preset=nope"], "nope"),
    (["second_teacher.enabled=true", "second_teacher.teacher={estimater: ascent}"],
     "teacher.estimater"),
]


@pytest.mark.parametrize("overrides,key", CONFIG_CASES, ids=lambda v: str(v))
def test_bad_config_value_is_one_clear_error(capsys, overrides, key):
    code, _, err = run_cli(capsys, "config", SMOKE, *overrides)
    assert_clear(code, err, key)


def test_bad_values_fail_before_any_stage(capsys, tmp_path):
    """`run` refuses at load: not a folder is made (the issue's 15-minute failure)."""
    code, _, err = run_cli(capsys, "run", SMOKE, f"output_root={tmp_path}",
                           "features.spaces=[pixels,foo]")
    assert_clear(code, err, "features.spaces", "foo")
    assert list(tmp_path.iterdir()) == []


def test_every_rule_is_declared_with_its_field():
    """Choices live with the fields: the feature registry and the toy world agree with them."""
    from attribution.config import FEATURE_EXTRACTORS, TOY_ATTRIBUTES
    from attribution.data.toy_world import ATTRIBUTES
    from attribution.features.extractors import REGISTRY

    assert set(REGISTRY) == set(FEATURE_EXTRACTORS)
    assert set(ATTRIBUTES) == set(TOY_ATTRIBUTES)


# ----------------------------------------------------------------------- config and sweep files
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,named", [
    ("world: {n_items: 5\n", "Could not parse"),  # YAML syntax
    ("- a\n- b\n", "must hold a mapping"),
    ("_base_: nowhere.yaml\n", "nowhere.yaml"),
    ("_base_: [1, 2]\n", "_base_"),
    ("world:\n  n_itemz: 5\n", "world.n_itemz"),
    ("student: 5\n", "student"),
], ids=["syntax", "list", "missing-base", "bad-base", "typo", "section-as-value"])
def test_bad_config_file(capsys, tmp_path, text, named):
    cfg = _write(tmp_path / "c.yaml", text)
    code, _, err = run_cli(capsys, "config", cfg)
    assert_clear(code, err, named)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_a_config_file_with_no_keys_is_an_error(capsys, tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "config", path)
    assert_clear(code, err, "No keys", str(path))


def test_output_root_that_is_a_file_or_sizes_that_do_not_fit(capsys, tmp_path):
    """An output root under a file, and a world far larger than this machine's memory, are
    refused before any work with the path or the figures."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for root in (afile, afile / "sub"):
        code, _, err = run_cli(capsys, "world", SMOKE, f"output_root={root}", "--no-progress")
        assert_clear(code, err, "output_root", str(afile))
    code, _, err = run_cli(capsys, "world", SMOKE, f"output_root={tmp_path / 'runs'}",
                           "world.n_items=1000000000000", "--no-progress")
    assert_clear(code, err, "world stage", "available")
    assert not (tmp_path / "runs" / "toy_smoke").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", tmp_path / "nope.yaml")
    assert_clear(code, err, "nope.yaml")


SWEEP_HEAD = "method: grid\nmetric: {name: student.mAP@5, goal: maximize}\n"


@pytest.mark.parametrize("body,named", [
    ("parameters:\n  student.loss: {values: [ce, mse, foo]}\n", "foo"),
    ("parameters:\n  student.p_outside: {values: [0.0, 0.5, 1.5]}\n", "student.p_outside"),
    ("parameters:\n  student.m: {values: [10, 20]}\n  student.budget: {values: [80]}\n",
     "student.budget"),
    ("parameters:\n  student.loss: {values: [ce, mse]\n", "Could not parse"),
    ("parameters:\n  student.loss: ce\n", "student.loss"),
    ("parameters:\n  student.loss: {values: []}\n", "student.loss"),
    ("parameters: {}\n", "parameters"),
], ids=["third-value", "range", "combination", "syntax", "no-values", "empty-values",
        "no-parameters"])
def test_bad_sweep_fails_before_the_first_run(capsys, tmp_path, body, named):
    sweep = _write(tmp_path / "s.yaml", SWEEP_HEAD + body
                   + f"command: [attribution, run, {SMOKE}, '${{args_no_hyphens}}']\n")
    out_root = tmp_path / "runs"
    code, _, err = run_cli(capsys, "sweep", sweep, f"output_root={out_root}")
    assert_clear(code, err, named)
    assert not out_root.exists()  # not one run started


def test_sweep_without_command(capsys, tmp_path):
    sweep = _write(tmp_path / "s.yaml", SWEEP_HEAD + "parameters:\n  seed: {values: [1]}\n")
    code, _, err = run_cli(capsys, "sweep", sweep)
    assert_clear(code, err, "command")


@pytest.mark.parametrize("argv,named", [
    (["counterfactual", SMOKE, "-k", "0"], "-k"),
    (["counterfactual", SMOKE, "-k", "-5"], "-k"),
    (["counterfactual", SMOKE, "--queries", "-1"], "--queries"),
    (["counterfactual", SMOKE, "--steps", "0"], "--steps"),
    (["study", "teacher-steps", SMOKE, "--path", "-1"], "--path"),
    (["study", "teacher-steps", SMOKE, "--factors", "0"], "--factors"),
    (["study", "teacher-steps", SMOKE, "--factors", "nan"], "--factors"),
    (["study", "teacher-steps", SMOKE, "--queries", "0"], "--queries"),
    (["plan", SMOKE, "--forwards-per-second", "0"], "--forwards-per-second"),
    (["plan", SMOKE, "--items", "x"], "--items"),
    (["sweep", "sweeps/loss.yaml", "--seeds", "-2"], "--seeds"),
    (["no-such-command"], "invalid choice"),
], ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else v)
def test_numeric_flags_are_checked_before_any_work(capsys, tmp_path, argv, named):
    code, _, err = run_cli(capsys, *argv)
    assert_clear(code, err, named)
    assert len(err.strip().splitlines()) == 1
