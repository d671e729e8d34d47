"""Bad input, as a new user would give it: every case is ONE clear error line (exit code 2)
that names the key or the file, before any stage spends work, and no traceback.

The cases run through ``attribution.cli.main`` in-process (a traceback would be an exception
escaping ``main`` and fail the test); a few run as real subprocesses to prove the exit code and
the stderr a shell sees.  Valid-but-odd images are converted with a one-line notice.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attribution.cli import main
from tests.conftest import ROOT, SMOKE

COCO = ROOT / "configs" / "experiment" / "coco_released.yaml"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"


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


# ---------------------------------------------------------------------------- released data
@pytest.fixture()
def released(tmp_path):
    from tests.test_released import write_released_fixture

    return write_released_fixture(tmp_path / "data", n_items=60, q_train=10, k=12, q_test=3)


class Exploit:
    """Unpickling this would run a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _coco(root: Path, tmp_path: Path) -> list[str]:
    return ["student", COCO, f"data.root={root}", f"output_root={tmp_path / 'runs'}",
            "student.epochs=1", "student.hidden=[8]", "student.k_eval=[5]", "student.logger=none",
            "student.num_workers=0", "student.queries_per_batch=4", "student.pairs_per_query=4",
            "--no-progress"]


def _pickle(path: Path, payload) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=4))


def _train_rank(root: Path) -> np.ndarray:
    with open(root / "influence_train.pkl", "rb") as f:
        return pickle.load(f)["random"]["rank"]  # our own fixture: trusted


@pytest.mark.parametrize("case", ["exploit", "exploit-nested", "ragged", "float-fraction",
                                  "strings", "not-a-dict", "no-random", "truncated", "empty",
                                  "text", "1-d", "out-of-range", "repeated-id", "no-rows"])
def test_bad_released_rankings(capsys, tmp_path, released, case):
    path = released / "influence_train.pkl"
    marker = tmp_path / "pwned"
    rank = _train_rank(released)
    payloads = {
        "exploit": Exploit(marker),
        "exploit-nested": {"random": {"rank": rank, "extra": Exploit(marker)}},
        "ragged": {"random": {"rank": [list(r) for r in rank[:3]] + [list(rank[3][:4])]}},
        "float-fraction": {"random": {"rank": np.random.default_rng(0).random(rank.shape)}},
        "strings": {"random": {"rank": np.array([["a"] * 12] * 10)}},
        "not-a-dict": [1, 2, 3],
        "no-random": {"other": {"rank": rank}},
        "1-d": {"random": {"rank": rank[0]}},
        "out-of-range": {"random": {"rank": rank + 1000}},
        "repeated-id": {"random": {"rank": np.zeros_like(rank)}},
        "no-rows": {"random": {"rank": rank[:0]}},
    }
    if case in payloads:
        _pickle(path, payloads[case])
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif case == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("rank: 1 2 3\n")
    code, _, err = run_cli(capsys, *_coco(released, tmp_path))
    assert_clear(code, err, "influence_train.pkl")
    assert not marker.exists(), "a crafted pickle ran code"


def test_released_whole_number_float_ranks_are_accepted(tmp_path, released):
    """Whole-number floats are item ids written as floats: converted, not refused."""
    from attribution.student.data import load_rankings

    rank = _train_rank(released)
    _pickle(released / "influence_train.pkl", {"random": {"rank": rank.astype(np.float64)}})
    assert np.array_equal(load_rankings(released, 60).train, rank)


@pytest.mark.parametrize("case", ["nan", "truncated", "int", "1-d", "wrong-dim"])
def test_bad_released_features(capsys, tmp_path, released, case):
    path = released / "feats" / "dino+clip_text" / "data_feats.npy"
    arr = np.load(path)
    if case == "nan":
        arr[3, 1] = np.nan
        np.save(path, arr)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "int":
        np.save(path, arr.astype(np.int32))
    elif case == "1-d":
        np.save(path, arr[:, 0])
    else:
        np.save(path, arr[:, :-1])
    code, _, err = run_cli(capsys, *_coco(released, tmp_path))
    assert_clear(code, err, "data_feats" if case != "wrong-dim" else "dino+clip_text")


def test_released_root_missing(capsys, tmp_path):
    code, _, err = run_cli(capsys, *_coco(tmp_path / "nowhere", tmp_path))
    assert_clear(code, err, "nowhere")


# ------------------------------------------------------------------ a finished smoke run, reused
@pytest.fixture(scope="module")
def finished(smoke_run):
    """The smoke pipeline run to the end (its generator is the session's)."""
    smoke_run.run()
    return smoke_run


def _copy_run(finished, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy of the finished run's folder, and the overrides that point at it."""
    src = Path(finished.cfg.output_root)
    dst = tmp_path / "runs"
    shutil.copytree(src, dst)
    return dst / finished.cfg.name, [f"output_root={dst}"]


def _stage_dir(run: Path, stage: str, finished) -> Path:
    return run / finished.dir(stage).name


def _flip_byte(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


CORRUPTIONS = [
    # (stage, file inside the stage folder, how)
    ("features", "toyclip_image__minilm/items.npy", _flip_byte),
    ("features", "toyclip_image__minilm/items.npy", _truncate),
    ("features", "pixels/query_test.npy", _flip_byte),
    ("features", "toyclip_image__minilm/manifest.json", _truncate),
    ("world", "images.npy", _flip_byte),
    ("world", "manifest.json", _truncate),
    ("text", "embeddings.npy", _flip_byte),
    ("queries", "query_test/latents.npy", _flip_byte),
    ("generator", "unet/diffusion_pytorch_model.safetensors", _truncate),
    ("fisher", "fisher.safetensors", _flip_byte),
    ("teacher", "teacher_test.npz", _flip_byte),
    ("teacher", "influence_train.pkl", _truncate),
    ("teacher", "shards/test/000000.npz", _flip_byte),
    ("toyclip", "toyclip.pt", _truncate),
    ("student", "head.pt", _truncate),
    ("student", "index.faiss", _flip_byte),
    ("student", "stage.json", _truncate),
    ("teacher", "stage.json", lambda p: p.write_text("{not json")),
]


@pytest.mark.parametrize("stage,name,how", CORRUPTIONS,
                         ids=[f"{s}/{n}/{h.__name__}" for s, n, h in CORRUPTIONS])
def test_corrupted_cached_file_is_detected(capsys, tmp_path, finished, stage, name, how):
    run, overrides = _copy_run(finished, tmp_path)
    target = _stage_dir(run, stage, finished) / name
    assert target.is_file(), target
    how(target)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")
              if p.is_file() and p != target and p.parent != run}
    code, _, err = run_cli(capsys, "run", SMOKE, *overrides, "--no-progress")
    assert_clear(code, err, str(target) if stage == "student" and name == "stage.json"
                 else name.split("/")[-1], "attribution ")  # the file and the rebuild command
    # no finished work elsewhere is lost or rewritten
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*")
             if p.is_file() and p != target and p.parent != run}
    assert {p: t for p, t in after.items() if p in before} == before


def test_corrupted_file_is_detected_by_attribute(capsys, tmp_path, finished):
    run, overrides = _copy_run(finished, tmp_path)
    _flip_byte(_stage_dir(run, "features", finished) / "toyclip_image__minilm" / "items.npy")
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    code, _, err = run_cli(capsys, "attribute", SMOKE, *overrides, "--image", img,
                           "--prompt", "a red circle")
    assert_clear(code, err, "items.npy", "attribution features")


def test_teacher_merge_names_the_bad_shard(capsys, tmp_path, finished):
    run, overrides = _copy_run(finished, tmp_path)
    shard = _stage_dir(run, "teacher", finished) / "shards" / "train" / "000003.npz"
    _flip_byte(shard, 200)
    code, _, err = run_cli(capsys, "teacher", "merge", SMOKE, *overrides)
    assert_clear(code, err, "000003.npz", "teacher score")


# ---------------------------------------------------------------------------- the attribute CLI
def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _make_image(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.png"
    if case == "text":
        path.write_text("this is not an image\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbled":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            path)
        path.write_bytes(path.read_bytes()[:400])
    elif case == "bomb":
        _png_claiming(path, 40_000, 40_000)
    elif case == "folder":
        path = tmp_path / "a_folder.png"
        path.mkdir()
    elif case == "missing":
        path = tmp_path / "missing.png"
    return path


@pytest.mark.parametrize("case", ["text", "empty", "garbled", "truncated", "bomb", "folder",
                                  "missing"])
def test_attribute_refuses_bad_images(capsys, tmp_path, finished, case):
    img = _make_image(tmp_path, case)
    code, _, err = run_cli(capsys, "attribute", SMOKE, f"output_root={finished.cfg.output_root}",
                           "--image", img, "--prompt", "a red circle")
    assert_clear(code, err, img.name)


@pytest.mark.parametrize("args,named", [
    (["-k", "0"], "-k"), (["-k", "-3"], "-k"), (["--prompt", "  "], "--prompt"),
    (["--grid", "{tmp}/no/such/folder/g.png"], "does not exist"),
    (["--grid", "{tmp}/grid.txt"], ".png"),
], ids=["k0", "k-negative", "empty-prompt", "grid-folder", "grid-suffix"])
def test_attribute_refuses_bad_arguments(capsys, tmp_path, finished, args, named):
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    prompt = [] if "--prompt" in args else ["--prompt", "a red circle"]
    code, _, err = run_cli(capsys, "attribute", SMOKE, f"output_root={finished.cfg.output_root}",
                           "--image", img, *prompt, *args)
    assert_clear(code, err, named)
    assert not (tmp_path / "no").exists()  # no folder created anywhere


@pytest.mark.parametrize("case,notice", [
    ("rgba", "alpha"), ("gray", "converted to RGB"), ("tiny", "upsampled"),
    ("huge", "downsampled"), ("wide", "center square"), ("palette", "converted to RGB"),
])
def test_attribute_converts_odd_images_with_a_notice(capsys, tmp_path, finished, case, notice):
    path = tmp_path / f"{case}.png"
    make = {"rgba": lambda: Image.new("RGBA", (16, 16), (200, 30, 30, 128)),
            "gray": lambda: Image.new("L", (16, 16), 128),
            "tiny": lambda: Image.new("RGB", (1, 1), (200, 30, 30)),
            "huge": lambda: Image.new("L", (9000, 9000), 90),
            "wide": lambda: Image.new("RGB", (40, 16), (200, 30, 30)),
            "palette": lambda: Image.new("RGB", (16, 16), (200, 30, 30)).convert("P")}
    make[case]().save(path, compress_level=1)
    code, out, err = run_cli(capsys, "attribute", SMOKE,
                             f"output_root={finished.cfg.output_root}", "--image", path,
                             "--prompt", "a red circle", "-k", "3")
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith("note: ")]
    assert out.startswith("note: ") and 1 <= len(notes) <= 2
    assert any(notice in ln and path.name in ln for ln in notes), notes


def test_attribute_k_above_items_is_capped_with_a_notice(capsys, tmp_path, finished):
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    code, out, _ = run_cli(capsys, "attribute", SMOKE, f"output_root={finished.cfg.output_root}",
                           "--image", img, "--prompt", "a red circle", "-k", "100000")
    assert code == 0 and "exceeds the 200 training items" in out


def test_attribute_before_the_student_exists(capsys, tmp_path):
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16)).save(img)
    code, _, err = run_cli(capsys, "attribute", SMOKE, f"output_root={tmp_path / 'runs'}",
                           "--image", img, "--prompt", "a red circle")
    assert_clear(code, err, "student", "attribution student")


# ------------------------------------------------------------------- as a shell sees it
@pytest.mark.parametrize("argv,named", [
    (["config", str(SMOKE), "student.lr=-1"], "student.lr"),
    (["run", str(SMOKE), "features.spaces=[pixels,foo]"], "features.spaces"),
], ids=["config", "run"])
def test_subprocess_exit_code_and_stderr(tmp_path, argv, named):
    proc = subprocess.run([sys.executable, "-m", "attribution.cli", *argv,
                           f"output_root={tmp_path}"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert named in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------- generator checkpoints
def test_corrupt_last_checkpoint_falls_back_to_latest(smoke_run, tmp_path, caplog):
    from attribution.common.files import DataFileError
    from attribution.generator.train import resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(smoke_run.dir("generator") / "checkpoints", ckpts)
    assert resume_checkpoint(ckpts) == ckpts / "last.ckpt"
    _truncate(ckpts / "last.ckpt")
    assert resume_checkpoint(ckpts) == ckpts / "latest.ckpt"  # the intact copy is used
    assert "last.ckpt" in caplog.text
    _flip_byte(ckpts / "latest.ckpt", 100)
    with pytest.raises(DataFileError, match=r"last\.ckpt.*latest\.ckpt"):
        resume_checkpoint(ckpts)


def test_checkpoint_that_would_run_code_is_refused(smoke_run, tmp_path):
    """A Lightning checkpoint is a pickle: a planted one must not execute on resume."""
    import torch

    from attribution.common.files import DataFileError
    from attribution.generator.train import resume_checkpoint

    marker = tmp_path / "pwned"
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"state_dict": {}, "loops": {}, "x": Exploit(marker)}, ckpts / "last.ckpt")
    with pytest.raises(DataFileError, match="last.ckpt"):
        resume_checkpoint(ckpts)
    assert not marker.exists()


def test_safe_unpickler_admits_arrays_and_containers(tmp_path):
    from attribution.common.files import safe_pickle_load

    payload = {"random": {"rank": np.arange(6).reshape(2, 3), "f": np.float32(1.5),
                          "list": [1, 2.0, "x", (3, None)], "o": np.array([1, "a"], object)}}
    path = tmp_path / "ok.pkl"
    for protocol in (2, 4, 5):
        _pickle(path, payload) if protocol == 4 else path.write_bytes(
            pickle.dumps(payload, protocol=protocol))
        back = safe_pickle_load(path)
        assert np.array_equal(back["random"]["rank"], payload["random"]["rank"])
        assert back["random"]["list"] == payload["random"]["list"]
