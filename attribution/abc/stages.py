"""Stages ``abc_teacher`` (the AbU teacher unlearning each held-out synthesized image from its own
customized model, scoring the whole pool) and ``abc`` (every method on the benchmark).

Methods in ``abc``: raw cosine similarity in every feature space, the same spaces tuned on the
training concepts' pairs (``mapper.py``), the student distilled from the teacher, and the teacher.
Soft attribution (``calibration.py``) is fit per method on calibration concepts, judged on
held-out ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attribution.abc.benchmark import (
    SAMPLE_ID_BASE,
    Benchmark,
    _normalize,
    _rank,
    calibrate,
    chance_average_precision,
    evaluate_rankings,
    load_teacher_scores,
    space_features,
    spaces_to_tune,
)
from attribution.abc.customize import Customized, load_delta
from attribution.abc.mapper import train_mapper
from attribution.common.devices import torch_device
from attribution.common.files import Dirs, atomic_write_bytes, load_npy
from attribution.data.dataset import CaptionedImageSet
from attribution.data.text_cache import TextTable
from attribution.generator.model import build_codec, build_scheduler, load_unet
from attribution.generator.train import encode_world
from attribution.student.deploy import load_head
from attribution.teacher.candidates import CandidateSet, candidate_losses
from attribution.teacher.params import select_parameters
from attribution.teacher.run import load_preconditioner
from attribution.teacher.scorer import AbUScorer, Query


def run_abc_teacher(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Stage ``abc_teacher``: the AbU teacher on the held-out synthesized images (resumable per
    query: ``teacher/<query>.npy``, influence over the whole pool).  ``inputs``: the world, text,
    generator, fisher and customize folders."""
    if cfg.abc.teacher_images == 0:
        return {"queries": 0}
    world = CaptionedImageSet(inputs["world"], verify=False)
    start = time.time()
    scores = teacher_scores(cfg, inputs, Benchmark(world, inputs["customize"]), out, progress)
    return {"queries": len(scores), "seconds_per_query": (time.time() - start) / len(scores)}


def teacher_scores(cfg, inputs: Dirs, bench: Benchmark, out: Path,
                   progress: bool = True) -> dict[int, np.ndarray]:
    """AbU influence over the whole pool for the first ``abc.teacher_images`` synthesized images
    of each held-out concept, each unlearned from its own customized model (cached per query).

    The Fisher is the base generator's (the customized model differs in K/V only)."""
    tc = cfg.teacher
    wanted = [(qi, c) for c in bench.concepts if c["split"] == "test"
              for qi in np.flatnonzero(bench.query_owner == c["index"])[:cfg.abc.teacher_images]]
    (out / "teacher").mkdir(parents=True, exist_ok=True)
    todo = [(qi, c) for qi, c in wanted if not (out / "teacher" / f"{qi}.npy").is_file()]
    if todo:
        device = torch_device(cfg.device)
        unet, manifest = load_unet(inputs["generator"])
        unet = unet.to(device)
        alphas = build_scheduler(cfg.generator).alphas_cumprod
        codec = build_codec(cfg.generator, bench.world.manifest["image_size"])
        table = TextTable.load(inputs["text"])
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
        precond = load_preconditioner(tc, inputs["fisher"], manifest["weights_sha256"],
                                      bench.n_items)
        everything = torch.arange(len(pool))
        by_concept: dict[int, list[int]] = {}
        for qi, c in todo:
            by_concept.setdefault(c["index"], []).append(int(qi))
        bar = tqdm(total=len(todo), desc="AbC teacher", disable=not progress)
        for index, qids in by_concept.items():
            delta = load_delta(bench.dir / "models" / f"{index:03d}.safetensors")
            with Customized(unet, delta):
                base = candidate_losses(unet, alphas.to(device), pool, everything,
                                        list(tc.timesteps), tc.captions, tc.flips, cfg.seed,
                                        tc.batch_size, device)
                scorer = AbUScorer(unet, alphas, pool, select_parameters(unet, tc.params),
                                   precond, base, tc, cfg.seed, device)
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


def _method_scores(cfg, inputs: Dirs, bench, spaces: list[str], train: np.ndarray,
                   calib_ids: list[int], progress: bool) -> tuple[dict, dict]:
    """(method -> scores (Q, P) over every query, space -> its mapper's fit): each space's
    cosine, its tuned mapper's where asked, and the student on its own space."""
    a = cfg.abc
    scores: dict[str, np.ndarray] = {}
    mappers = {}
    for space in tqdm(spaces, desc="AbC features", disable=not progress):
        pool_f, q_f = space_features(cfg, inputs, bench, space)
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
            head = load_head(inputs["student"])
            with torch.no_grad():
                scores["student"] = (head.embed(torch.from_numpy(q_f))
                                     @ head.embed(torch.from_numpy(pool_f)).T).numpy()
    return scores, mappers


def run_abc(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Score every method on the benchmark; write abc.json and calibration.json (the report
    draws the figure).  ``inputs``: the world, toyclip, features, student, customize and
    abc_teacher folders."""
    a = cfg.abc
    bench = Benchmark(CaptionedImageSet(inputs["world"], verify=False), inputs["customize"])
    test = bench.query_split == "test"
    # the last `abc.calibration_concepts` training concepts fit the calibrators and are kept
    # from the mappers (a mapper's scores on its own training pairs would be overconfident)
    calib_ids = [c["index"] for c in bench.concepts if c["split"] == "train"][
        a.n_train - a.calibration_concepts:]
    calib = np.isin(bench.query_owner, calib_ids) & ~test
    scores, mappers = _method_scores(cfg, inputs, bench, list(a.spaces) or list(
        cfg.features.spaces), ~test & ~calib, calib_ids, progress)
    results = {method: evaluate_rankings(_rank(s[test]), bench.positives[test],
                                         bench.query_kind[test], list(a.k))
               for method, s in scores.items()}
    t = load_teacher_scores(inputs["abc_teacher"])
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
    best = max(results, key=lambda m: results[m]["all"]["mAP"])
    return {"pool": bench.pool_size, "test_queries": int(test.sum()), "best_method": best,
            "best_mAP": results[best]["all"]["mAP"], "chance_mAP": chance["mAP"]}
