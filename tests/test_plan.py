"""``attribution plan``: the forwards it plans are the forwards a run makes."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from attribution.pipeline import Pipeline
from attribution.plan import format_plan, plan
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
