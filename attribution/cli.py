"""Command line: ``attribution <command> CONFIG [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from attribution.common.files import DataFileError
from attribution.config import ConfigError, load_config
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import STUDY_SPLITS, QuerySet
from attribution.generator.text_encoder import TextEncoderError

STAGE_COMMANDS = {
    "world": "generate the toy world (images, captions, attributes, manifest)",
    "text": "encode every caption with the frozen text encoder (cache)",
    "train-generator": "train (or resume) the text-to-image generator",
    "queries": "sample the train/test query sets in the released layout",
    "fidelity": "measure prompt fidelity of generated samples against chance",
    "toyclip": "train the small CLIP of the toy world's feature spaces",
    "features": "extract and cache item/query features for every features.spaces entry",
    "student": "train the student on the teacher's rankings, evaluate mAP@k, build the index",
    "customize": "customize the generator on new concepts' exemplars and synthesize (AbC)",
    "abc": "the customization benchmark: every method's recall of known exemplars, tuned "
           "features, soft-attribution calibration",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, e.g. configs/experiment/toy.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attribution",
        description="Fast data attribution for text-to-image models (AbU teacher -> student).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the main job: every stage, cached under runs/<name>/")
    _add_config_args(p)
    for name, text in STAGE_COMMANDS.items():
        _add_config_args(sub.add_parser(name, help=text))
    p = sub.add_parser("teacher", help="the AbU teacher on its own: fisher | score | merge | "
                                       "steps (the step-size study) | curvature (its "
                                       "step-free Gauss-Newton limit, ranked as teacher-gn)")
    p.add_argument("action", choices=["fisher", "score", "merge", "steps", "curvature"])
    _add_config_args(p)
    p.add_argument("--factors", type=float, nargs="+", default=None,
                   help="steps: multiples of the configured step η/gain (default 1e-4 ... 10)")
    p.add_argument("--queries", type=int, default=None,
                   help="steps: the first N test queries (default all); with --split val, N "
                        "training queries in all (default 12 + the validation-concept ones)")
    p.add_argument("--dampings", type=float, nargs="+", default=None,
                   help="steps: the same factors at these dampings too (teacher.damping's "
                        "meaning; the configured one is always in)")
    p.add_argument("--split", choices=STUDY_SPLITS, default="test",
                   help="steps: test queries (reporting) or training queries with the "
                        "validation concepts (choosing a step without the test set)")
    p.add_argument("--path", type=int, default=0, metavar="M",
                   help="steps: unlearn along a path of M natural-gradient steps per decade "
                        "(the query gradient recomputed at each) instead of one step")
    p.add_argument("--even", action="store_true",
                   help="steps: score each factor both ways (ascent and descent) and rank by "
                        "the even part of the loss change, ½[ΔL(+η) + ΔL(−η)]: the curvature "
                        "along the step, its first-order term cancelled")
    p = sub.add_parser("attribute", help="top training items for one generated image + prompt")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--image", required=True, help="the generated image (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help="its prompt")
    p.add_argument("-k", type=int, default=10, help="how many training items to show")
    p.add_argument("--grid", default=None, help="write query + top-k images to this PNG")
    p = sub.add_parser("sweep", help="run a W&B sweep file locally (grid/random), skip done runs")
    p.add_argument("config", help="sweeps/<name>.yaml (its command names the experiment)")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every setting once per student seed (student.seed); figures "
                        "average them with standard-error bars")
    p = sub.add_parser("counterfactual",
                       help="leave-K-out: retrain without each method's top-K, measure ΔLoss")
    _add_config_args(p)
    p.add_argument("--methods", nargs="+", default=["teacher", "student", "dtrak", "random"],
                   help="teacher | student | random | dtrak | abu_diagonal | a feature space")
    p.add_argument("--queries", type=int, nargs="+", default=None,
                   help="query ids (default: test 0 1 2; val: the training queries that "
                        "prompt a validation concept)")
    p.add_argument("-k", type=int, default=10, help="training items removed per query")
    p.add_argument("--steps", type=int, default=None,
                   help="retrain on this shorter schedule (reference retrained the same way)")
    p.add_argument("--split", choices=STUDY_SPLITS, default="test",
                   help="test queries (reporting) or the step study's training queries "
                        "(--split val there first): judging the teacher's step without the "
                        "test set; val has teacher, teacher@<factor> and random")
    p = sub.add_parser("figures", help="draw the paper's figures from sweep results")
    p.add_argument("--sweeps", default="sweeps", help="folder of sweep files")
    p.add_argument("--results", default="runs/sweeps", help="folder of local sweep tables")
    p.add_argument("--out", default="runs/figures", help="where the PNGs go")
    p.add_argument("--wandb", nargs="*", default=[], metavar="SWEEP=ENTITY/PROJECT/ID",
                   help="read these sweeps from the W&B API instead of local tables")
    p = sub.add_parser("coco-encode", help="pre-encode MSCOCO: VAE latents (+ flips) and text "
                                          "token states into memory-mapped arrays (resumable)")
    p.add_argument("--images", required=True, help="COCO train2017/ folder")
    p.add_argument("--captions", required=True, help="captions_train2017.json")
    p.add_argument("--vae", required=True, help="AutoencoderKL folder (e.g. SD-2 .../vae)")
    p.add_argument("--text-encoder", required=True,
                   help="text encoder folder (an SD pipeline folder with tokenizer/ + "
                        "text_encoder/, or a transformers model folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--max-length", type=int, default=77)
    p.add_argument("--scale", type=float, default=None,
                   help="latent scaling factor (default: the VAE config's scaling_factor)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    for name in ("lightning", "lightning.pytorch", "lightning.fabric",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if args.command == "sweep":
            from attribution.sweeps import run_sweep

            table = run_sweep(args.config, args.overrides, progress=not args.no_progress,
                              seeds=args.seeds)
            print(f"results: {table}")
            return 0
        if args.command == "coco-encode":
            from diffusers import AutoencoderKL

            from attribution.common.devices import torch_device
            from attribution.data.coco import CocoCaptions, encode_coco
            from attribution.generator.text_encoder import load_text_encoder

            ds = CocoCaptions(args.images, args.captions, args.size, args.captions_per_image)
            device = torch_device(args.device)
            vae = AutoencoderKL.from_pretrained(args.vae).eval().to(device)
            scale = args.scale if args.scale is not None else vae.config.scaling_factor
            enc = load_text_encoder(args.text_encoder, max_length=args.max_length)
            print(json.dumps(encode_coco(ds, vae, enc, args.out, scale, args.seed, args.chunk),
                             indent=2))
            return 0
        if args.command == "figures":
            from attribution.figures import sweep_figures

            online = dict(w.split("=", 1) for w in args.wandb)
            made = sweep_figures(args.sweeps, args.results, args.out, online)
            if not made:
                print("no sweep results to draw yet", file=sys.stderr)
                return 1
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        from attribution.pipeline import Pipeline

        if args.command == "attribute":
            from attribution.attribute import attribute, format_attribution

            pipe = Pipeline(cfg, config_path=args.config)
            res = attribute(cfg, pipe.deployment_dirs(), args.image, args.prompt, args.k,
                            args.grid, calibrator=pipe.calibrator("student"))
            print(format_attribution(res))
            return 0
        pipe = Pipeline(cfg, progress=not args.no_progress, config_path=args.config)
        if args.command == "counterfactual":
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
            out = pipe.run_counterfactual(args.methods, queries, args.k,
                                          progress=not args.no_progress, steps=args.steps,
                                          split=args.split)
            path = result_file(pipe.cfg, out, args.steps, args.split)
            result = json.loads(path.read_text())
            print(format_counterfactual(result))
            metrics = pipe.root / "metrics.json"  # the methods' speeds: the main job's report
            if metrics.is_file():
                fig = counterfactual_figure(result, json.loads(metrics.read_text()),
                                            path.with_suffix(".png"))
                print(f"figure: {fig}")
            else:  # a counterfactual may run before (or without) the rest of the main job
                print(f"figure: not drawn — its x-axis is each method's speed, from "
                      f"{metrics}, which the main job writes (attribution run CONFIG); "
                      f"the table above is the whole result ({path})")
            pairs = [p for p in schedule_pairs(out) if p["split"] == args.split]
            if pairs:  # the other schedules' results beside it: do they agree?
                print(format_schedule_pairs(pairs))
            return 0
        if args.command == "teacher" and args.action == "steps":
            from attribution.figures import step_figure
            from attribution.teacher.steps import study_dir, summary_name
            from attribution.teacher.steps_table import format_steps

            summary = pipe.run_step_study(args.factors, args.queries,
                                          progress=not args.no_progress,
                                          dampings=args.dampings, split=args.split,
                                          path=args.path, even=args.even)
            print(format_steps(summary))
            name = summary_name(args.split, args.even).replace(".json", ".png")
            fig = step_figure(summary, study_dir(pipe.step_study_dir(), args.path) / name)
            print(f"figure: {fig}")
            return 0
        if args.command == "teacher" and args.action == "curvature":
            summary = pipe.run_curvature(args.split, args.queries,
                                         progress=not args.no_progress)
            recall = ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if "recall" in k)
            speed = summary["seconds_per_query"]
            print(f"curvature (Gauss–Newton, difference factor {summary['difference_factor']:g})"
                  f" on {len(summary['rows_scored'])} {args.split} queries"
                  + (f", {speed:.1f} s a query" if speed else ", all cached")
                  + (f"; {recall}" if recall else "")
                  + f"; ranked as teacher-gn -> {pipe.step_study_dir() / 'gn'}")
            return 0
        if args.command == "teacher" and args.action == "merge":
            from attribution.teacher.run import merge_outputs

            out = pipe.dir("teacher")
            n = {s: len(QuerySet(pipe.dir("queries") / f"query_{s}")) for s in ("train", "test")}
            world = CaptionedImageSet(pipe.dir("world"), verify=False)
            print(json.dumps(merge_outputs(out, n, len(world)), indent=2))
            return 0
        stage = {"train-generator": "generator"}.get(args.command, args.command)
        if args.command == "teacher":
            stage = {"fisher": "fisher", "score": "teacher"}[args.action]
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
    except (ConfigError, DataFileError, TextEncoderError, FileNotFoundError,
            FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
