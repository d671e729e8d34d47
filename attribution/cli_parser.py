"""The ``attribution`` command line's parser: every command, its arguments and their ranges
(a bad command line is one ``error:`` line, exit 2)."""

from __future__ import annotations

import argparse
import sys

from attribution.data.queries import STUDY_SPLITS

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


class Parser(argparse.ArgumentParser):
    """argparse with one ``error:`` line (exit 2) for a bad command line, like every other
    input error of this tool."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (`{self.prog} -h` lists the arguments)",
              file=sys.stderr)
        sys.exit(2)


def _number(kind, low: float, strict: bool = False):
    """An argparse type: ``kind`` (int or float), finite, >= ``low`` (> with ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or (
                value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, COUNT, POSITIVE = _number(int, 1), _number(int, 0), _number(float, 0, True)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, e.g. configs/experiment/toy.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--rebuild", action="store_true",
                   help="run in a folder an older version made (its stages are recomputed "
                        "beside the old ones)")


def _add_teacher(sub) -> None:
    p = sub.add_parser("teacher", help="the AbU teacher on its own: fisher | score | merge")
    p.add_argument("action", choices=["fisher", "score", "merge"])
    _add_config_args(p)


STUDIES = {"teacher-steps": "the step-size study: the test (or, for choosing, training) "
                            "queries rescored at multiples of the configured step",
           "teacher-curvature": "the step study's queries ranked by the step-free "
                                "Gauss-Newton curvature (counterfactual: teacher-gn)"}


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="research studies beside the main job: "
                                     + "; ".join(f"{k} ({v})" for k, v in STUDIES.items()))
    p.add_argument("study", choices=list(STUDIES))
    _add_config_args(p)
    p.add_argument("--queries", type=POSITIVE_INT, default=None,
                   help="the first N test queries (default all); with --split val, N "
                        "training queries in all (default 12 + the validation-concept ones)")
    p.add_argument("--split", choices=STUDY_SPLITS, default="test",
                   help="test queries (reporting) or training queries with the validation "
                        "concepts (choosing a step without the test set)")
    p.add_argument("--factors", type=POSITIVE, nargs="+", default=None,
                   help="teacher-steps: multiples of the configured step η/gain (default "
                        "1e-4 ... 10)")
    p.add_argument("--dampings", type=POSITIVE, nargs="+", default=None,
                   help="teacher-steps: the same factors at these dampings too "
                        "(teacher.damping's meaning; the configured one is always in)")
    p.add_argument("--path", type=COUNT, default=0, metavar="M",
                   help="teacher-steps: unlearn along a path of M natural-gradient steps per "
                        "decade (the query gradient recomputed at each) instead of one step")
    p.add_argument("--even", action="store_true",
                   help="teacher-steps: score each factor both ways (ascent and descent) and "
                        "rank by the even part of the loss change, ½[ΔL(+η) + ΔL(−η)]: the "
                        "curvature along the step, its first-order term cancelled")


def _add_attribute(sub) -> None:
    p = sub.add_parser("attribute", help="top training items for one generated image + prompt")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--image", required=True, help="the generated image (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help="its prompt")
    p.add_argument("-k", type=POSITIVE_INT, default=10, help="how many training items to show")
    p.add_argument("--grid", default=None, help="write query + top-k images to this PNG")
    p.add_argument("--html", default=None,
                   help="write the report's gallery for this query to this page (the "
                        "student's top k beside the untuned features')")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a W&B sweep file locally (grid/random), skip done runs")
    p.add_argument("config", help="sweeps/<name>.yaml (its command names the experiment)")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rebuild", action="store_true",
                   help="run in an experiment folder an older version made")
    p.add_argument("--experiment", default=None,
                   help="run the sweep on this experiment file instead of its command's")
    p.add_argument("--seeds", type=COUNT, nargs="+", default=None,
                   help="run every setting once per student seed (student.seed); figures "
                        "average them with standard-error bars")


def _add_counterfactual(sub) -> None:
    p = sub.add_parser("counterfactual",
                       help="leave-K-out: retrain without each method's top-K, measure ΔLoss")
    _add_config_args(p)
    p.add_argument("--methods", nargs="+", default=["teacher", "student", "dtrak", "random"],
                   help="teacher | student | random | dtrak | abu_diagonal | a feature space")
    p.add_argument("--queries", type=COUNT, nargs="+", default=None,
                   help="query ids (default: test 0 1 2; val: the training queries that "
                        "prompt a validation concept)")
    p.add_argument("-k", type=POSITIVE_INT, default=10, help="training items removed per query")
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="retrain on this shorter schedule (reference retrained the same way)")
    p.add_argument("--split", choices=STUDY_SPLITS, default="test",
                   help="test queries (reporting) or the step study's training queries "
                        "(`study teacher-steps --split val` first): judging the teacher's step without the "
                        "test set; val has teacher, teacher@<factor> and random")


def _add_figures(sub) -> None:
    p = sub.add_parser("figures", help="draw the paper's figures from sweep results")
    p.add_argument("--sweeps", default="sweeps", help="folder of sweep files")
    p.add_argument("--results", default="runs/sweeps", help="folder of local sweep tables")
    p.add_argument("--out", default="runs/figures", help="where the PNGs go")
    p.add_argument("--wandb", nargs="*", default=[], metavar="SWEEP=ENTITY/PROJECT/ID",
                   help="read these sweeps from the W&B API instead of local tables")


def _add_coco_sample(sub) -> None:
    p = sub.add_parser("coco-sample", help="write the project's own small folder in the MSCOCO "
                                           "2017 captions layout, with real COCO's quirks")
    p.add_argument("out", help="the folder to write (annotations/, train2017/, val2017/)")
    p.add_argument("--images", type=POSITIVE_INT, default=300, help="train2017 images")
    p.add_argument("--seed", type=COUNT, default=0)


def _add_coco_encode(sub) -> None:
    p = sub.add_parser("coco-encode", help="pre-encode MSCOCO: VAE latents (+ flips) and text "
                                          "token states into memory-mapped arrays (resumable)")
    p.add_argument("--images", required=True, help="COCO train2017/ folder")
    p.add_argument("--captions", required=True, help="captions_train2017.json")
    p.add_argument("--vae", required=True, help="AutoencoderKL folder (e.g. SD-2 .../vae)")
    p.add_argument("--text-encoder", required=True,
                   help="text encoder folder (an SD pipeline folder with tokenizer/ + "
                        "text_encoder/, or a transformers model folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=POSITIVE_INT, default=128)
    p.add_argument("--captions-per-image", type=POSITIVE_INT, default=5)
    p.add_argument("--max-length", type=POSITIVE_INT, default=77)
    p.add_argument("--scale", type=POSITIVE, default=None,
                   help="latent scaling factor (default: the VAE config's scaling_factor)")
    p.add_argument("--chunk", type=POSITIVE_INT, default=64)
    p.add_argument("--seed", type=COUNT, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="the bill before paying it: per stage, generator "
                                    "forwards, disk, peak memory and hours (runs nothing)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--forwards-per-second", type=POSITIVE, default=None,
                      help="generator forward rows per second on your device (default: the "
                           "toy UNet's on 2 CPU cores)")
    rate.add_argument("--measure", type=POSITIVE, nargs="?", const=10.0, default=None,
                      metavar="SECONDS",
                      help="time this config's UNet on this machine's device (random weights, "
                           "the run's shapes, the teacher's batch size) for SECONDS (10) and "
                           "price the hours at that rate")
    p.add_argument("--items", type=POSITIVE_INT, default=None,
                   help="training items, where the config cannot tell before its world runs")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="attribution",
        description="Fast data attribution for text-to-image models (AbU teacher -> student).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the main job: every stage, cached under runs/<name>/")
    _add_config_args(p)
    for name, text in STAGE_COMMANDS.items():
        _add_config_args(sub.add_parser(name, help=text))
    _add_teacher(sub)
    _add_study(sub)
    _add_attribute(sub)
    _add_sweep(sub)
    _add_counterfactual(sub)
    _add_figures(sub)
    _add_coco_encode(sub)
    _add_coco_sample(sub)
    _add_plan(sub)
    _add_config(sub)
    return parser


# ------------------------------------------------------------------------------ handlers
# Each command's handler takes the parsed arguments and returns the exit code; commands that
# read an experiment config get it loaded (``cfg``) and, when they run stages, a ``pipe``.
