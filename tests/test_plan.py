"""``attribution plan``: the forwards it plans are the forwards a run makes."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from attribution.pipeline import Pipeline
from attribution.plan import (
    DEFAULT_FPS,
    bill,
    format_plan,
    model_shape,
    plan,
    rows_per_second,
    sample_shape,
)
from tests.conftest import run_cli, smoke_config


class ForwardRows:
    """Counts the rows every UNet forward receives while active (a global module hook)."""

    def __enter__(self):
        self.rows = 0

        def hook(module, args, output):
            if isinstance(module, UNet2DConditionModel):
                self.rows += int(args[0].shape[0])

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("variant", [
    ["ceiling.test_queries=2", "ceiling.curation_queries=2", "second_teacher.enabled=true"],
    pytest.param(["teacher.estimator=ascent", "ceiling.enabled=false"],
                 marks=pytest.mark.slow),  # the suite's budget: the other two estimators
    ["teacher.difference=central", "ceiling.enabled=false", "teacher.k=30"],
])
def test_planned_forwards_are_the_forwards_a_run_counts(smoke_run, tmp_path, variant):
    """Known answer: the teacher, its ceiling and a second teacher, run on the smoke world,
    pass exactly as many rows through the generator as the plan says (three estimators)."""
    shared = Pipeline(smoke_config(smoke_run.cfg.output_root, *variant), progress=False,
                      echo=lambda s: None)
    shared.run(["fisher", "queries"])  # the generator and the queries are the session's
    cfg = smoke_config(tmp_path, *variant)  # a root of its own: nothing scored here is cached
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.check_format()
    for stage in ("world", "text", "generator", "queries", "fisher"):
        pipe.dir(stage).symlink_to(shared.dir(stage), target_is_directory=True)
    planned = {p.stage: p for p in plan(cfg)}
    for stage in ("teacher", "ceiling", "second_teacher"):
        if stage not in planned:
            continue
        with ForwardRows() as counted:
            assert not pipe.run([stage])[stage].cached
        assert counted.rows == planned[stage].fwd, stage


def test_plan_command_prints_the_bill(capsys, tmp_path):
    code, out, err = run_cli(capsys, "plan", "configs/experiment/toy.yaml",
                             f"output_root={tmp_path}", "--forwards-per-second", "1000")
    assert code == 0, err
    assert "teacher" in out and "ceiling" in out and "hours at 1000 forward rows/s" in out
    assert not (tmp_path / "toy").exists()  # nothing was run or written
    coco = ["world.root=/nowhere", "generator.vae_path=/v"]
    code, _, err = run_cli(capsys, "plan", "configs/experiment/coco_generator.yaml", *coco)
    assert code == 2 and "--items" in err
    code, out, err = run_cli(capsys, "plan", "configs/experiment/coco_generator.yaml", *coco,
                             "--items", "118287")
    assert code == 0, err
    teacher = next(line for line in out.splitlines() if line.startswith("teacher"))
    # 100 test queries x 118,287 items x 200 samples dominate: ~2.4e9 rows
    assert int(teacher.split()[1].replace(",", "")) > 2_000_000_000


def test_plan_table_has_every_column():
    cfg = smoke_config("/tmp/unused")
    text = format_plan(plan(cfg), fps=100.0)
    assert text.splitlines()[0].split()[:3] == ["stage", "fwd", "rows"]
    assert "total" in text


def test_rows_per_second_times_only_after_the_warm_up():
    """Known answer on a fake clock: every call takes 0.5 s and passes 10 rows; the warm-up is
    not timed, and timing stops at the first call past 1.2 s: 3 calls, 1.5 s, 20 rows/s."""
    now = [0.0]

    def step():
        now[0] += 0.5

    rate, timed = rows_per_second(step, 10, 1.2, clock=lambda: now[0])
    assert (rate, timed) == (20.0, 1.5)
    # at least two timed calls, however short the requested time
    now[0] = 0.0
    assert rows_per_second(step, 10, 0.0, clock=lambda: now[0]) == (20.0, 1.0)


def test_plan_measure_times_this_configs_unet(capsys, tmp_path):
    """``--measure`` prices the hours at the rate of the config's own UNet, timed here."""
    from types import SimpleNamespace

    from attribution.generator.model import build_unet

    code, out, err = run_cli(capsys, "plan", "configs/experiment/toy_smoke.yaml",
                             f"output_root={tmp_path}", "teacher.batch_size=8",
                             "--measure", "0.05")
    assert code == 0, err
    cfg = smoke_config(tmp_path)
    params = sum(p.numel() for p in build_unet(
        cfg.generator, SimpleNamespace(channels=3, size=cfg.world.image_size)).parameters())
    line = next(x for x in out.splitlines() if x.startswith("hours at"))
    assert f"measured now: this config's UNet ({params / 1e6:.1f} M parameters" in line
    assert "batches of 8" in line
    rate = float(line.split()[2])
    teacher = next(x for x in out.splitlines() if x.startswith("teacher")).split()
    fwd, bwd = (int(v.replace(",", "")) for v in teacher[1:3])
    assert float(teacher[-3]) == pytest.approx((fwd + 2 * bwd) / rate / 3600, rel=1e-2)
    code, _, err = run_cli(capsys, "plan", "configs/experiment/toy_smoke.yaml", "--measure",
                           "--forwards-per-second", "5")
    assert code == 2 and "not allowed with" in err


def test_an_encoded_worlds_plan_takes_its_image_size_from_its_manifest(tmp_path):
    """An encoded world made at 128 px plans 4 x 16 x 16 latents whatever world.image_size says."""
    import json

    from attribution.config import load_config

    (tmp_path / "manifest.json").write_text(json.dumps({"n_items": 10, "image_size": 128}))
    cfg = load_config("configs/experiment/coco_generator.yaml",
                      [f"world.root={tmp_path}", "generator.vae_path=/v"])
    assert cfg.world.image_size != 128
    assert model_shape(cfg) == (4, 16)
    elems, _ = sample_shape(cfg)
    assert elems == 4 * 16 * 16
    stages = {p.stage: p for p in plan(cfg)}
    assert stages["text"].written == 0  # the encoding's token states: nothing to write
    assert not stages["world"].notes
    missing = load_config("configs/experiment/coco_generator.yaml",
                          [f"world.root={tmp_path / 'nowhere'}", "generator.vae_path=/v"])
    world = plan(missing, 10)[0]
    assert world.stage == "world" and "world.image_size=16" in world.notes[0]


def test_a_run_prints_the_bill_of_the_generator_work_ahead(smoke_run, tmp_path):
    """Before any work a run prints one line: the planned rows of the stages it will run that
    use the generator, and nothing when those are finished."""
    lines: list[str] = []
    cached = Pipeline(smoke_run.cfg, progress=False, echo=lines.append)
    cached.run(["generator"])  # finished in the session's root: nothing ahead, no bill
    assert lines and not any(x.startswith("[     plan]") for x in lines)

    cfg = smoke_config(tmp_path)  # a root of its own; the world and generator are the session's
    pipe = Pipeline(cfg, progress=False, echo=lines.append, config_path="smoke.yaml")
    pipe.check_format()
    for stage in ("world", "text", "generator"):
        pipe.dir(stage).symlink_to(smoke_run.dir(stage), target_is_directory=True)
    lines.clear()
    pipe.run(["queries"])
    bills = [x for x in lines if x.startswith("[     plan]")]
    rows = next(p for p in plan(cfg) if p.stage == "queries").fwd
    assert bills == [f"[     plan] queries: {rows:,} forward + 0 backward generator rows, "
                     f"~{max(rows / DEFAULT_FPS / 60, 1):.0f} min at {DEFAULT_FPS:g} rows/s (the "
                     "toy UNet on 2 CPU cores; a resumed stage counted whole; `attribution "
                     "plan smoke.yaml --measure` for this machine's rate)"]
    assert lines.index(bills[0]) == 0  # before the stage's own line
    # no generator work ahead, no line
    assert bill([p for p in plan(cfg) if p.stage in ("world", "text", "student")]) is None
