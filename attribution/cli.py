"""Command line: ``attribution <command> CONFIG [key=value ...]``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from attribution.cli_parser import build_parser
from attribution.common.devices import DeviceError
from attribution.common.files import DataFileError
from attribution.config import ConfigError, load_config
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.generator.text_encoder import TextEncoderError


def _sweep(args) -> int:
    from attribution.sweeps import run_sweep

    table = run_sweep(args.config, args.overrides, progress=not args.no_progress,
                      seeds=args.seeds, rebuild=args.rebuild, experiment=args.experiment)
    print(f"results: {table}")
    return 0


def _coco_encode(args) -> int:
    from diffusers import AutoencoderKL

    from attribution.common.devices import torch_device
    from attribution.data.coco import CocoCaptions, encode_coco
    from attribution.generator.text_encoder import load_text_encoder

    ds = CocoCaptions(args.images, args.captions, args.size, args.captions_per_image)
    ds.check_images()  # every image decodes, before the models load
    device = torch_device(args.device)
    vae = AutoencoderKL.from_pretrained(args.vae).eval().to(device)
    scale = args.scale if args.scale is not None else vae.config.scaling_factor
    enc = load_text_encoder(args.text_encoder, max_length=args.max_length)
    print(json.dumps(encode_coco(ds, vae, enc, args.out, scale, args.seed, args.chunk),
                     indent=2))
    return 0


def _coco_sample(args) -> int:
    from attribution.data.coco_sample import write_coco_sample

    out = Path(args.out)
    if (out / "annotations").exists() or (out / "train2017").exists():
        print(f"error: {out} already holds a COCO layout: choose another folder or delete it",
              file=sys.stderr)
        return 2
    write_coco_sample(out, args.images, args.seed)
    print(f"wrote {args.images} train2017 images and their captions under {out}")
    return 0


def _figures(args) -> int:
    from attribution.figures import sweep_figures

    online = dict(w.split("=", 1) for w in args.wandb)
    if not sweep_figures(args.sweeps, args.results, args.out, online):
        print("no sweep results to draw yet", file=sys.stderr)
        return 1
    return 0


def _plan(args, cfg) -> int:
    from attribution.plan import DEFAULT_FPS, format_plan, measure_forwards_per_second, plan

    try:
        stages = plan(cfg, args.items)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    fps, source = args.forwards_per_second or DEFAULT_FPS, None
    if args.measure is not None:
        fps, source = measure_forwards_per_second(cfg, args.measure)
    print(format_plan(stages, fps, source))
    return 0


def _config(args, cfg) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg))
    return 0


def _attribute(args, cfg) -> int:
    from attribution.attribute import attribute, format_attribution
    from attribution.pipeline import Pipeline

    pipe = Pipeline(cfg, config_path=args.config)
    res = attribute(cfg, pipe.deployment_dirs(), args.image, args.prompt, args.k, args.grid,
                    calibrator=pipe.calibrator("student"), html_path=args.html)
    print(format_attribution(res))
    return 0


def _counterfactual(args, pipe) -> int:
    from attribution.config import val_concept_rows
    from attribution.counterfactual.results import (
        format_counterfactual,
        format_schedule_pairs,
        result_file,
        schedule_pairs,
    )
    from attribution.figures import counterfactual_figure

    queries = args.queries
    if queries is None:  # test: the first three; val: the known-answer queries
        queries = [0, 1, 2] if args.split == "test" else val_concept_rows(pipe.cfg)
    out = pipe.run_counterfactual(args.methods, queries, args.k, progress=not args.no_progress,
                                  steps=args.steps, split=args.split)
    path = result_file(pipe.cfg, out, args.steps, args.split, args.k)
    result = json.loads(path.read_text())
    print(format_counterfactual(result))
    metrics = pipe.root / "metrics.json"  # the methods' speeds: the main job's report
    if metrics.is_file():
        fig = counterfactual_figure(result, json.loads(metrics.read_text()),
                                    path.with_suffix(".png"))
        print(f"figure: {fig}")
    else:  # a counterfactual may run before (or without) the rest of the main job
        print(f"figure: not drawn — its x-axis is each method's speed, from {metrics}, which "
              f"the main job writes (attribution run CONFIG); the table above is the whole "
              f"result ({path})")
    pairs = [p for p in schedule_pairs(out) if p["split"] == args.split]
    if pairs:  # the other schedules' results beside it: do they agree?
        print(format_schedule_pairs(pairs))
    return 0


def _teacher_merge(args, pipe) -> int:
    from attribution.teacher.run import merge_outputs

    n = {s: len(QuerySet(pipe.dir("queries") / f"query_{s}")) for s in ("train", "test")}
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    print(json.dumps(merge_outputs(pipe.dir("teacher"), n, len(world)), indent=2))
    return 0


def _teacher(args, pipe) -> int:
    if args.action == "merge":
        return _teacher_merge(args, pipe)
    return _stages(args, pipe, {"fisher": "fisher", "score": "teacher"}[args.action])


def _study(args, pipe) -> int:
    """``attribution study NAME``: a study (``attribution/studies/``) on this run's finished
    teacher, in the folder tied to the teacher's key; only the front door imports the studies."""
    from attribution.studies.commands import STUDIES

    with pipe.lock():
        pipe.run(["teacher"])
        return STUDIES[args.study](args, pipe.cfg, pipe.dirs(), pipe.step_study_dir())


def _stages(args, pipe, stage: str | None = None) -> int:
    """``run`` (every stage) or one stage command, then what its results say."""
    stage = stage or {"train-generator": "generator"}.get(args.command, args.command)
    results = pipe.run(None if stage == "run" else [stage])
    if "fidelity" in results:
        from attribution.fidelity import format_fidelity

        res = json.loads((results["fidelity"].dir / "fidelity.json").read_text())
        print("prompt fidelity (generated samples, uniform prompts):")
        print(format_fidelity(res))
    if "abc" in results:
        from attribution.abc.format import format_abc
        from attribution.figures import abc_figure

        summary = json.loads((results["abc"].dir / "abc.json").read_text())
        print(format_abc(summary))
        print(f"figure: {abc_figure(summary, pipe.root / 'figures' / 'abc.png')}")
    if "teacher" in results:
        from attribution.teacher.evaluate import format_known_answers

        print("teacher known answers (planted concepts, test queries):")
        print(format_known_answers(results["teacher"].summary.get("known_answers", {})))
    return 0


# The command table: what each command's handler receives.
NO_CONFIG = {"sweep": _sweep, "coco-encode": _coco_encode, "coco-sample": _coco_sample,
             "figures": _figures}
WITH_CONFIG = {"plan": _plan, "config": _config, "attribute": _attribute}
WITH_PIPELINE = {"counterfactual": _counterfactual, "teacher": _teacher, "study": _study}  # others: _stages


def _dispatch(args) -> int:
    if args.command in NO_CONFIG:
        return NO_CONFIG[args.command](args)
    cfg = load_config(args.config, args.overrides)
    # torch's compile cache under the runs folder, not left in the system temp folder
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path(cfg.output_root).resolve() / ".cache" / "torchinductor"))
    if args.command in WITH_CONFIG:
        return WITH_CONFIG[args.command](args, cfg)
    from attribution.pipeline import Pipeline

    pipe = Pipeline(cfg, progress=not args.no_progress, config_path=args.config,
                    rebuild=args.rebuild)
    return WITH_PIPELINE.get(args.command, _stages)(args, pipe)


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the running stage like Ctrl-C does (a BaseException, so no
    ``except Exception`` on the way swallows it); Lightning passes the signal on to this
    handler after its own."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # -h, or Parser.error's one line
        return int(done.code or 0)
    _quiet_logs()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(args)
    except Terminated:
        print("terminated (SIGTERM): finished files are kept; rerun the same command to "
              "resume", file=sys.stderr)
        return 143
    except (ConfigError, DataFileError, TextEncoderError, FileNotFoundError,
            FloatingPointError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
