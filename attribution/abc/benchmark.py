"""The customization benchmark with known answers (AbC): build it, then score every method on it.

Stage ``customize`` (resumable per concept): for each new concept, render its exemplars, fine-tune
the generator's cross-attention K/V on them (``customize.py``), save the delta, and synthesize
``abc.images`` images with prompts that use the concept's word.

Stage ``abc``: the retrieval pool is the training set ∪ every concept's exemplars.  Each
synthesized image ranks the pool; its exemplars are the known answers.  Methods: raw cosine
similarity in every feature space, the same spaces tuned on the training concepts' pairs
(``mapper.py``), the student distilled from the teacher, and the AbU teacher itself (unlearning
the synthesized image from its customized model, scoring the whole pool).  Reported on held-out
concepts, per kind (object / style): Recall@K and mAP of the exemplars, with chance.  Soft
attribution (``calibration.py``) is fit per method on training concepts, judged on held-out ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attribution.abc import concepts as C
from attribution.abc.calibration import Calibrator, calibration_report, fit_calibrator
from attribution.abc.customize import (
    Customized,
    CustomizeSettings,
    Prior,
    customize,
    load_delta,
    save_delta,
)
from attribution.abc.mapper import train_mapper
from attribution.common.files import (
    DataFileError,
    atomic_save_npz,
    atomic_write_bytes,
    load_npy,
    read_json,
)
from attribution.config import to_dict
from attribution.data.dataset import CaptionedImageSet
from attribution.data.images import from_uint8, save_grid, to_uint8
from attribution.metrics import average_precision, recall_at_k, standard_error

SAMPLE_ID_BASE = 2_000_000  # synthesized images' sampling/draw ids: disjoint from the queries'


def all_concepts(cfg) -> list[C.Concept]:
    """Training concepts first (``abc.n_train``), then held-out ones; kinds alternate."""
    a = cfg.abc
    return C.make_concepts(a.n_train + a.n_test, a.exemplars, cfg.seed)


def split_of(cfg, concept: C.Concept) -> str:
    return "train" if concept.index < cfg.abc.n_train else "test"


def _device(cfg) -> str:
    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ stage: customize
def run_customize(pipe, out: Path, progress: bool = True) -> dict:
    """Customize one model per concept and synthesize its images (skips finished concepts)."""
    from attribution.data.text_cache import TextTable
    from attribution.generator.model import build_codec, build_scheduler, load_unet
    from attribution.generator.sampling import sample
    from attribution.generator.text_encoder import load_text_encoder
    from attribution.generator.train import encode_world

    cfg, a = pipe.cfg, pipe.cfg.abc
    world = CaptionedImageSet(pipe.dir("world"))
    size, n_caps = world.manifest["image_size"], len(world.captions[0])
    unet, manifest = load_unet(pipe.dir("generator"))
    device = _device(cfg)
    unet = unet.to(device)
    scheduler = build_scheduler(cfg.generator)
    alphas = scheduler.alphas_cumprod.to(device)
    codec = build_codec(cfg.generator, size)
    table = TextTable.load(pipe.dir("text"))
    enc = load_text_encoder(cfg.text_encoder.name, cfg.text_encoder.weights,
                            cfg.text_encoder.max_length)
    prior = None
    if a.prior_weight > 0:
        prior = Prior(encode_world(codec, world).to(device), table.rows, table.lookup)
    settings = CustomizeSettings(steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                                 prior_weight=a.prior_weight,
                                 prior_batch_size=a.prior_batch_size, params=a.params,
                                 seed=cfg.seed)
    uncond = enc.encode([""])[0]
    sc = cfg.queries.sampling
    templates = list(range(len(C.toy_world.TEMPLATES)))
    concepts = all_concepts(cfg)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "synth").mkdir(parents=True, exist_ok=True)
    done, seconds = 0, []
    for c in tqdm(concepts, desc="customizing", disable=not progress):
        model_path = out / "models" / f"{c.index:03d}.safetensors"
        synth_path = out / "synth" / f"{c.index:03d}.npz"
        if synth_path.is_file():
            continue
        start = time.time()
        ex_images = np.stack([C.render(c, lay, size) for lay in c.exemplars])
        ex_z = codec.encode(from_uint8(ex_images))
        ex_caps = [C.captions(lay, templates) for lay in c.exemplars]
        ex_cond = enc.encode([t for caps in ex_caps for t in caps]).view(
            len(ex_caps), len(templates), *uncond.shape)
        if not model_path.is_file():
            delta = customize(unet, alphas, ex_z.to(device), ex_cond.to(device), settings,
                              c.index, prior)
            save_delta(model_path, delta, {"concept": c.word, "kind": c.kind,
                                           "generator_sha256": manifest["weights_sha256"]})
        delta = load_delta(model_path)  # what every later use sees (stored as float16)
        layouts = C.synthesis_prompts(c, a.images, cfg.seed)
        prompts = [C.prompt(lay) for lay in layouts]
        cond = enc.encode(prompts)
        ids = [SAMPLE_ID_BASE + c.index * 100 + j for j in range(a.images)]
        with Customized(unet, delta):
            z = sample(unet, scheduler, cond, uncond, ids, (codec.channels, codec.size,
                                                            codec.size),
                       seed=sc.seed, sampler=sc.sampler, steps=sc.steps, guidance=sc.guidance,
                       batch_size=sc.batch_size, device=device, progress=False)
        atomic_save_npz(synth_path, images=to_uint8(codec.decode(z)), z=z.numpy(),
                  cond=cond.numpy(), exemplar_images=ex_images, exemplar_z=ex_z.numpy(),
                  exemplar_cond=ex_cond[:, :n_caps].numpy().astype(np.float16))
        done += 1
        seconds.append(time.time() - start)
    info = []
    for c in concepts:
        with np.load(out / "synth" / f"{c.index:03d}.npz") as f:
            n_img = int(f["images"].shape[0])
        info.append({"index": c.index, "kind": c.kind, "word": c.word, "params": c.params,
                     "split": split_of(cfg, c), "exemplars": c.exemplars,
                     "exemplar_captions": [C.captions(lay, list(range(n_caps)))
                                           for lay in c.exemplars],
                     "prompts": [C.prompt(lay) for lay in
                                 C.synthesis_prompts(c, a.images, cfg.seed)][:n_img]})
    atomic_write_bytes(out / "concepts.json", json.dumps(info, indent=2).encode())
    _grid(out, concepts, cfg)
    return {"concepts": len(concepts), "customized_now": done,
            "seconds_per_concept": float(np.mean(seconds)) if seconds else 0.0,
            "delta_bytes": (out / "models" / "000.safetensors").stat().st_size}


def _grid(out: Path, concepts: list[C.Concept], cfg) -> None:
    """One row per held-out concept (up to 12): exemplars, then synthesized images."""
    rows = []
    for c in [c for c in concepts if split_of(cfg, c) == "test"][:12]:
        with np.load(out / "synth" / f"{c.index:03d}.npz") as f:
            rows.append(np.concatenate([f["exemplar_images"], f["images"]]))
    if rows:
        width = max(len(r) for r in rows)
        pad = [np.concatenate([r, np.full((width - len(r), *r.shape[1:]), 255, np.uint8)])
               for r in rows]
        save_grid(np.concatenate(pad), out / "grid_test.png", ncol=width, scale=4)


# ------------------------------------------------------------------------------ the benchmark
class Benchmark:
    """The pool, the synthesized queries and their known answers, read from a customize stage.

    Pool: ids 0..N−1 are the training items, N.. the exemplars in concept order.
    Queries: every synthesized image, with its concept, kind and split.
    """

    def __init__(self, world: CaptionedImageSet, customize_dir: Path):
        self.world, self.dir = world, Path(customize_dir)
        path = self.dir / "concepts.json"
        if not path.is_file():
            raise DataFileError(f"customization results missing: {path} (run the customize stage)")
        self.concepts = json.loads(path.read_text())
        n = len(world)
        ex_images, ex_caps, ex_owner, q_images, q_prompts, q_owner = [], [], [], [], [], []
        self.synth = []
        for c in self.concepts:
            f = dict(np.load(self.dir / "synth" / f"{c['index']:03d}.npz"))
            self.synth.append(f)
            ex_images.append(f["exemplar_images"])
            ex_caps += [caps[0] for caps in c["exemplar_captions"]]
            ex_owner += [c["index"]] * len(f["exemplar_images"])
            q_images.append(f["images"])
            q_prompts += c["prompts"]
            q_owner += [c["index"]] * len(f["images"])
        self.n_items = n
        self.exemplar_images = np.concatenate(ex_images)
        self.exemplar_captions = ex_caps
        self.exemplar_owner = np.asarray(ex_owner)
        self.query_images = np.concatenate(q_images)
        self.query_prompts = q_prompts
        self.query_owner = np.asarray(q_owner)
        by_index = {c["index"]: c for c in self.concepts}
        self.query_kind = np.asarray([by_index[i]["kind"] for i in q_owner])
        self.query_split = np.asarray([by_index[i]["split"] for i in q_owner])
        owner_of_pool = np.concatenate([np.full(n, -1), self.exemplar_owner])
        self.positives = self.query_owner[:, None] == owner_of_pool[None, :]  # bool (Q, P)
        # the pool a training concept's mapper may see: training items + training exemplars
        train_ids = {c["index"] for c in self.concepts if c["split"] == "train"}
        self.train_pool = np.concatenate([np.ones(n, bool),
                                          np.isin(self.exemplar_owner, list(train_ids))])

    @property
    def pool_size(self) -> int:
        return self.n_items + len(self.exemplar_owner)

    def exemplar_ids(self, q: int) -> np.ndarray:
        return np.flatnonzero(self.positives[q])


def chance_average_precision(pool: int, positives: int) -> float:
    """E[AP] of a uniformly random ranking: (1/P)·[H_P + (n−1)/(P−1)·(P − H_P)]."""
    h = float(np.sum(1.0 / np.arange(1, pool + 1)))
    if pool == 1:
        return 1.0
    return (h + (positives - 1) / (pool - 1) * (pool - h)) / pool


def evaluate_rankings(rankings: np.ndarray, positives: np.ndarray, kinds: np.ndarray,
                      ks: list[int]) -> dict:
    """Recall@k and mAP of the known answers, overall and per kind.

    Args:
        rankings: int (Q, P) pool ids best first; positives: bool (Q, P); kinds: (Q,) strings.

    Returns:
        {kind or "all": {"recall@k": mean, "mAP": mean, "mAP_stderr": s.e., "queries": n}}
    """
    per = {"ap": [], **{k: [] for k in ks}}
    for r, pos in zip(rankings, positives):
        ids = np.flatnonzero(pos)
        per["ap"].append(average_precision(r, ids))
        for k in ks:
            per[k].append(recall_at_k(r, ids, k))
    out = {}
    for kind in ["all", *sorted(set(kinds.tolist()))]:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        if not sel.any():
            continue
        ap = np.asarray(per["ap"])[sel]
        row = {f"recall@{k}": float(np.mean(np.asarray(per[k])[sel])) for k in ks}
        row.update({"mAP": float(ap.mean()), "mAP_stderr": standard_error(ap),
                    "queries": int(sel.sum())})
        out[kind] = row
    return out


def _normalize(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=-1)


def _rank(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def space_features(pipe, bench: Benchmark, space: str) -> tuple[np.ndarray, np.ndarray]:
    """(pool (P, D), queries (Q, D)) features: training items from the features stage's cache,
    exemplars and synthesized images extracted here (image + caption / prompt)."""
    from attribution.features.cache import load_features
    from attribution.features.extractors import build_extractor
    from attribution.student.train import space_dir

    items = np.asarray(load_features(space_dir(pipe.dir("features"), space),
                                     expect_items=bench.n_items, expect_name=space)["items"])
    ext = build_extractor(space, pipe.feature_context(bench.world.manifest["image_size"]),
                          pipe.cfg.features.l2_per_block).eval()
    ex = ext.extract(from_uint8(bench.exemplar_images), bench.exemplar_captions).numpy()
    q = ext.extract(from_uint8(bench.query_images), bench.query_prompts).numpy()
    return np.concatenate([items, ex]).astype(np.float32), q.astype(np.float32)


def run_abc_teacher(pipe, out: Path, progress: bool = True) -> dict:
    """Stage ``abc_teacher``: the AbU teacher on the held-out synthesized images (resumable per
    query: ``teacher/<query>.npy``, influence over the whole pool)."""
    if pipe.cfg.abc.teacher_images == 0:
        return {"queries": 0}
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    start = time.time()
    scores = teacher_scores(pipe, Benchmark(world, pipe.dir("customize")), out, progress)
    return {"queries": len(scores), "seconds_per_query": (time.time() - start) / len(scores)}


def load_teacher_scores(folder: Path) -> dict[int, np.ndarray]:
    return {int(f.stem): load_npy(f, "Customization teacher scores")
            for f in sorted((Path(folder) / "teacher").glob("*.npy")) if f.stem.isdigit()}


def teacher_scores(pipe, bench: Benchmark, out: Path, progress: bool = True) -> dict[int, np.ndarray]:
    """AbU influence over the whole pool for the first ``abc.teacher_images`` synthesized images
    of each held-out concept, each unlearned from its own customized model (cached per query).

    The Fisher is the base generator's (the customized model differs in K/V only)."""
    from attribution.data.text_cache import TextTable
    from attribution.generator.model import build_codec, build_scheduler, load_unet
    from attribution.generator.train import encode_world
    from attribution.teacher.params import select_parameters
    from attribution.teacher.run import _settings, load_preconditioner
    from attribution.teacher.scorer import AbUScorer, Query
    from attribution.teacher.scoring import CandidateSet, candidate_losses

    cfg, tc = pipe.cfg, pipe.cfg.teacher
    wanted = [(qi, c) for c in bench.concepts if c["split"] == "test"
              for qi in np.flatnonzero(bench.query_owner == c["index"])[:cfg.abc.teacher_images]]
    (out / "teacher").mkdir(parents=True, exist_ok=True)
    todo = [(qi, c) for qi, c in wanted if not (out / "teacher" / f"{qi}.npy").is_file()]
    if todo:
        device = _device(cfg)
        unet, manifest = load_unet(pipe.dir("generator"))
        unet = unet.to(device)
        alphas = build_scheduler(cfg.generator).alphas_cumprod
        codec = build_codec(cfg.generator, bench.world.manifest["image_size"])
        table = TextTable.load(pipe.dir("text"))
        ex_z = torch.cat([torch.from_numpy(f["exemplar_z"]) for f in bench.synth])
        ex_cond = torch.cat([torch.from_numpy(f["exemplar_cond"]) for f in bench.synth])
        n_caps = table.rows.shape[1]
        pool_table = TextTable(torch.cat([table.embeddings, ex_cond.flatten(0, 1).half()]),
                               table.rows, table.texts, table.source)
        first = len(table.embeddings)
        ex_rows = first + torch.arange(len(ex_z) * n_caps).view(len(ex_z), n_caps)
        pool = CandidateSet(torch.cat([encode_world(codec, bench.world), ex_z]),
                            torch.cat([table.rows, ex_rows]), pool_table)
        # the base generator's Fisher, gain N = the training set (not the pool)
        precond = load_preconditioner(tc, pipe.dir("fisher"), manifest["weights_sha256"],
                                      bench.n_items)
        s = _settings(cfg)
        everything = torch.arange(len(pool))
        by_concept: dict[int, list[int]] = {}
        for qi, c in todo:
            by_concept.setdefault(c["index"], []).append(int(qi))
        bar = tqdm(total=len(todo), desc="AbC teacher", disable=not progress)
        for index, qids in by_concept.items():
            delta = load_delta(bench.dir / "models" / f"{index:03d}.safetensors")
            with Customized(unet, delta):
                base = candidate_losses(unet, alphas.to(device), pool, everything,
                                        list(s.timesteps), s.captions, s.flips, s.seed,
                                        s.batch_size, device)
                scorer = AbUScorer(unet, alphas, pool, select_parameters(unet, tc.params),
                                   precond, base, s, device)
                for qi in qids:
                    j = qi - int(np.flatnonzero(bench.query_owner == index)[0])
                    f = bench.synth[[c["index"] for c in bench.concepts].index(index)]
                    q = Query("abc", SAMPLE_ID_BASE + index * 100 + j,
                              torch.from_numpy(f["z"][j]), torch.from_numpy(f["cond"][j]),
                              everything)
                    r = scorer.score(q)
                    np.save(out / "teacher" / f"{qi}.npy", r["influence"].numpy())
                    bar.update(1)
        bar.close()
    return {int(qi): load_npy(out / "teacher" / f"{qi}.npy", "Customization teacher scores",
                              rebuild="delete it; rerunning `attribution abc CONFIG` recomputes it")
            for qi, _ in wanted}


def run_abc(pipe, out: Path, progress: bool = True) -> dict:
    """Score every method on the benchmark; write abc.json, calibration.json and the figure."""
    from attribution.attribute import load_head

    cfg, a = pipe.cfg, pipe.cfg.abc
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    bench = Benchmark(world, pipe.dir("customize"))
    test = bench.query_split == "test"
    # the last `abc.calibration_concepts` training concepts fit the calibrators and are kept
    # from the mappers (a mapper's scores on its own training pairs would be overconfident)
    calib_ids = [c["index"] for c in bench.concepts if c["split"] == "train"][
        a.n_train - a.calibration_concepts:]
    calib = np.isin(bench.query_owner, calib_ids) & ~test
    train = ~test & ~calib
    spaces = list(a.spaces) or list(cfg.features.spaces)
    scores: dict[str, np.ndarray] = {}  # method -> (Q, P) over every query
    mappers = {}
    for space in tqdm(spaces, desc="AbC features", disable=not progress):
        pool_f, q_f = space_features(pipe, bench, space)
        pool_n, q_n = _normalize(pool_f), _normalize(q_f)
        scores[space] = (q_n @ pool_n.T).numpy()
        if space in spaces_to_tune(cfg, spaces):
            visible = bench.train_pool & ~np.isin(np.concatenate(
                [np.full(bench.n_items, -1), bench.exemplar_owner]), calib_ids)
            tp = torch.from_numpy(visible)
            mapper, fit = train_mapper(q_n[torch.from_numpy(train)], pool_n[tp],
                                       torch.from_numpy(bench.positives[train][:, visible]),
                                       kind=a.mapper, steps=a.mapper_steps, lr=a.mapper_lr,
                                       temperature=a.mapper_temperature, seed=cfg.seed)
            with torch.no_grad():
                scores[f"{space} tuned"] = (mapper(q_n) @ mapper(pool_n).T).numpy()
            mappers[space] = fit
        if space == cfg.student.feature:
            head = load_head(pipe.dir("student"))
            with torch.no_grad():
                scores["student"] = (head.embed(torch.from_numpy(q_f))
                                     @ head.embed(torch.from_numpy(pool_f)).T).numpy()
    results = {}
    for method, s in scores.items():
        results[method] = evaluate_rankings(_rank(s[test]), bench.positives[test],
                                            bench.query_kind[test], list(a.k))
    t = load_teacher_scores(pipe.dir("abc_teacher"))
    if t:
        qids = np.asarray(sorted(t))
        results["teacher"] = evaluate_rankings(_rank(np.stack([t[q] for q in qids])),
                                               bench.positives[qids], bench.query_kind[qids],
                                               list(a.k))
    n_pos = int(bench.positives[0].sum())
    chance = {"mAP": chance_average_precision(bench.pool_size, n_pos),
              **{f"recall@{k}": min(1.0, k / bench.pool_size) for k in a.k}}
    calibration, calibrators = calibrate(scores, bench.positives, calib, test,
                                         list(a.fixed_temperatures))
    summary = {"pool": bench.pool_size, "exemplars_per_concept": n_pos,
               "concepts": {"train": int(sum(c["split"] == "train" for c in bench.concepts)),
                            "test": int(sum(c["split"] == "test" for c in bench.concepts)),
                            "calibration": len(calib_ids)},
               "test_queries": int(test.sum()), "chance": chance, "methods": results,
               "mappers": mappers, "calibration": calibration,
               "student_feature": cfg.student.feature}
    atomic_write_bytes(out / "abc.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "calibration.json", json.dumps(
        {m: c.to_dict() for m, c in calibrators.items()}, indent=2).encode())
    from attribution.figures import abc_figure

    abc_figure(summary, out / "abc.png")
    best = max(results, key=lambda m: results[m]["all"]["mAP"])
    return {"pool": bench.pool_size, "test_queries": int(test.sum()), "best_method": best,
            "best_mAP": results[best]["all"]["mAP"], "chance_mAP": chance["mAP"]}


def spaces_to_tune(cfg, spaces: list[str]) -> list[str]:
    return [s for s in spaces if s in (list(cfg.abc.tuned_spaces) or spaces)]


def calibrate(scores: dict[str, np.ndarray], positives: np.ndarray, train: np.ndarray,
              test: np.ndarray, fixed: list[float]) -> tuple[dict, dict[str, Calibrator]]:
    """Per method: fit (τ, b) on the ``train`` queries (the calibration concepts); report it and
    fixed-τ softmaxes on the ``test`` (held-out) queries."""
    report, fitted = {}, {}
    for method, s in scores.items():
        cal = fit_calibrator(s[train], positives[train])
        fitted[method] = cal
        row = {"fitted": {**cal.to_dict(), **calibration_report(cal, s[test], positives[test])}}
        for tau in fixed:
            fixed_cal = Calibrator(tau)
            row[f"tau={tau:g}"] = {**fixed_cal.to_dict(),
                                   **calibration_report(fixed_cal, s[test], positives[test])}
        report[method] = row
    return report, fitted


def format_abc(summary: dict) -> str:
    """The benchmark's table (held-out concepts) and the calibration table, as markdown."""
    ks = sorted(int(k.split("@")[1]) for k in summary["chance"] if k.startswith("recall@"))
    head = "| method | kind | queries | " + " | ".join(f"R@{k}" for k in ks) + " | mAP |"
    lines = [f"Pool: {summary['pool']} items (training set ∪ all exemplars), "
             f"{summary['exemplars_per_concept']} exemplars per concept; "
             f"{summary['concepts']['train']} training concepts (of which "
             f"{summary['concepts'].get('calibration', 0)} fit the calibrators and are kept from "
             f"the mappers) / {summary['concepts']['test']} held-out concepts; "
             f"{summary['test_queries']} held-out synthesized images.", "",
             head, "|" + "---|" * (4 + len(ks))]
    ch = summary["chance"]
    lines.append("| chance | any | | " + " | ".join(f"{ch[f'recall@{k}']:.3f}" for k in ks)
                 + f" | {ch['mAP']:.3f} |")
    for method, res in summary["methods"].items():
        for kind, r in res.items():
            lines.append(f"| {method} | {kind} | {r['queries']} | "
                         + " | ".join(f"{r[f'recall@{k}']:.3f}" for k in ks)
                         + f" | {r['mAP']:.3f} ± {r['mAP_stderr']:.3f} |")
    lines += ["", "Methods that read text (text spaces, concatenations with one, the student, the "
              "teacher through its prompt conditioning) see the concept's made-up word in the "
              "synthesized image's prompt and in its exemplars' captions; image-only spaces "
              "(pixels, *_image) must find the exemplars from pixels alone."]
    lines += ["", "Soft attribution on held-out concepts (fit on the calibration concepts): NLL of the "
              "true exemplars (lower is better), probability mass on them (ideal 1), ECE of the "
              "top-10 shares.", "",
              "| method | calibration | τ | offset b | NLL | exemplar mass | ECE@10 |",
              "|---|---|---|---|---|---|---|"]
    for method, rows in summary["calibration"].items():
        for name, r in rows.items():
            lines.append(f"| {method} | {name} | {r['tau']:.4g} | {r['offset']:.3g} | "
                         f"{r['nll']:.3f} | {r['exemplar_mass']:.3f} | {r['ece@10']:.3f} |")
    return "\n".join(lines)


def load_calibrator(pipe, method: str = "student") -> Calibrator | None:
    """The soft-attribution calibrator the ``abc`` stage fit for ``method`` (None when that stage
    has not run for this config)."""
    if pipe.finished("abc") is None:  # verifies the stage's files when it has finished
        return None
    cal = read_json(pipe.dir("abc") / "calibration.json", "Calibration").get(method)
    return None if cal is None else Calibrator(cal["tau"], cal["offset"])


CUSTOMIZE_KEYS = ("n_train", "n_test", "exemplars", "images", "steps", "lr", "batch_size",
                  "prior_weight", "prior_batch_size", "params")


def stage_sections(cfg) -> tuple[dict, dict]:
    """(what the customize stage reads, what the abc stage reads) of the ``abc`` section."""
    d = to_dict(cfg.abc)
    d["spaces"] = d["spaces"] or list(cfg.features.spaces)
    d.pop("enabled")
    custom = {k: d.pop(k) for k in CUSTOMIZE_KEYS}
    d.pop("teacher_images")  # the abc_teacher stage's
    return custom, d

