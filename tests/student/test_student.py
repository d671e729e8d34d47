import pickle

import numpy as np
import pytest
import torch

from attribution import retrieval
from attribution.common.files import DataFileError
from attribution.student.data import (
    EpochKeySampler,
    PairDataModule,
    PairPlan,
    collate_pairs,
    load_rankings,
    select_queries,
)
from attribution.student.head import EmbeddingHead
from attribution.student.losses import LOSSES, build_loss
from attribution.student.module import StudentModule


def _ranks(q=20, k=30, n=200, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n, size=k, replace=False) for _ in range(q)])


def test_outside_fraction_matches_p_and_items_are_outside():
    ranks = _ranks()
    plan = PairPlan(ranks, 200, pairs_per_query=10, p_outside=0.3, m=None, seed=1)
    outside, total = 0, 0
    for epoch in range(5):
        for i in range(len(plan)):
            b = plan[(epoch, i)]
            sw = b["outside"].numpy()
            q_set = set(ranks[b["query"]].tolist())
            assert all(int(x) not in q_set for x in b["items"][sw])
            assert all(int(x) in q_set for x in b["items"][~sw])
            assert np.allclose(b["target"][sw].numpy(), 1 / 30)
            outside += sw.sum()
            total += len(sw)
    frac = outside / total  # 3000 Bernoulli(0.3) draws: sd ≈ 0.0084
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / total)


def test_targets_follow_teacher_rank_and_m_subset():
    ranks = _ranks()
    plan = PairPlan(ranks, 200, pairs_per_query=5, p_outside=0.0, m=10, seed=0)
    seen = {}
    for i in range(len(plan)):
        b = plan[(0, i)]
        for item, y in zip(b["items"].tolist(), b["target"].tolist()):
            seen.setdefault(b["query"], {})[item] = y
    q0 = seen[0]
    assert len(q0) == 10  # M kept candidates, each seen once per epoch (2 chunks of 5)
    kept_sorted = sorted(q0, key=lambda it: list(ranks[0]).index(it))  # teacher order
    assert [q0[it] for it in kept_sorted] == pytest.approx([1 - j / 10 for j in range(10)])


def test_batches_do_not_depend_on_worker_count():
    ranks = _ranks()
    batches = []
    for workers in (0, 2):
        dm = PairDataModule(ranks, 200, queries_per_batch=4, pairs_per_query=8, p_outside=0.2,
                            seed=3, num_workers=workers)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(2)
        batches.append([b for b in loader])
    for a, b in zip(*batches):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_select_queries_budget():
    assert select_queries(100, 20, None, 400, 50) == (20, 20)
    with pytest.raises(DataFileError, match="either"):
        select_queries(100, 20, 5, 400, 50)
    with pytest.raises(DataFileError, match="only 100"):
        select_queries(100, 200, None, None, 50)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_decreases_on_a_fixed_problem(name):
    torch.manual_seed(0)
    n, d = 64, 16
    items = torch.randn(n, d)
    queries = torch.randn(8, d)
    # teacher: rank items by a hidden linear similarity
    w = torch.randn(d, d)
    ranks = torch.argsort(-(queries @ w @ items.T), dim=1)[:, :32].numpy()
    plan = PairPlan(ranks, n, pairs_per_query=32, p_outside=0.0, m=None, seed=0)
    batch = collate_pairs([plan[(0, i)] for i in range(len(plan))])
    head = EmbeddingHead([d, 32, 32], dropout=0.0)
    module = StudentModule(head, build_loss(name), items, queries)
    opt = module.configure_optimizers()
    first = last = None
    for _ in range(150):
        loss = module.loss_fn(module.scores(batch), batch["target"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < 0.9 * first


def test_score_sign_convention():
    head = EmbeddingHead([4, 4], dropout=0.0)
    e = torch.nn.functional.normalize(torch.randn(1, 4), dim=-1)
    near, far = e.clone(), -e
    s = head.score(e, torch.stack([near, far], 1))
    assert s[0, 0] > s[0, 1]  # more similar = higher score = more influential, from step 0
    assert float(head.alpha) > 0


def _write_released(root, q_train=3, k=5, q_test=2, n=12, seed=0):
    rng = np.random.default_rng(seed)
    train_rank = np.stack([rng.choice(n, size=k, replace=False) for _ in range(q_train)])
    inf = rng.normal(size=(q_test, n)).astype(np.float32)
    payload_train = {"random": {"rank": train_rank,
                                "influence_subset": rng.normal(size=(q_train, k)),
                                "rank_influence_subset": np.tile(np.arange(k), (q_train, 1))}}
    payload_test = {"random": {"influence": inf, "rank": np.argsort(-inf, axis=1)}}
    (root / "influence_train.pkl").write_bytes(pickle.dumps(payload_train))
    (root / "influence_test.pkl").write_bytes(pickle.dumps(payload_test))
    return train_rank, payload_test


def test_released_layout_loader(tmp_path):
    train_rank, test = _write_released(tmp_path)
    r = load_rankings(tmp_path, 12)
    np.testing.assert_array_equal(r.train, train_rank)
    np.testing.assert_array_equal(r.test, test["random"]["rank"])
    with pytest.raises(DataFileError, match="in \\[0, 10\\)"):
        load_rankings(tmp_path, 10)


def test_released_layout_bad_inputs(tmp_path):
    _write_released(tmp_path)
    data = pickle.loads((tmp_path / "influence_train.pkl").read_bytes())
    data["random"]["rank"][0, 1] = data["random"]["rank"][0, 0]
    (tmp_path / "influence_train.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(DataFileError, match="repeat"):
        load_rankings(tmp_path, 12)
    (tmp_path / "influence_train.pkl").write_bytes(pickle.dumps({"other": 1}))
    with pytest.raises(DataFileError, match="released"):
        load_rankings(tmp_path, 12)
    (tmp_path / "influence_test.pkl").unlink()
    with pytest.raises(DataFileError, match="influence_t"):
        load_rankings(tmp_path, 12)


def test_faiss_exact_equals_brute_force_and_approx_recall():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:20] + 0.1 * rng.normal(size=(20, 32)).astype(np.float32)
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    _, ids = retrieval.search(retrieval.build_index(x, "flat"), q, 10)
    np.testing.assert_array_equal(ids, brute)
    for kind in ("ivf", "hnsw"):
        _, approx = retrieval.search(retrieval.build_index(x, kind, nprobe=16), q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, brute)])
        assert recall > 0.8, kind


def test_index_save_load_roundtrip(tmp_path):
    x = np.eye(8, dtype=np.float32)
    retrieval.save_index(retrieval.build_index(x), tmp_path / "i.faiss")
    _, ids = retrieval.search(retrieval.load_index(tmp_path / "i.faiss"), x[3], 1)
    assert ids[0, 0] == 3
    with pytest.raises(DataFileError):
        retrieval.load_index(tmp_path / "none.faiss")


def test_epoch_sampler_is_seeded():
    a = list(EpochKeySampler(10, seed=1))
    s = EpochKeySampler(10, seed=1)
    s.set_epoch(1)
    assert a == list(EpochKeySampler(10, seed=1)) and a != list(s)


def test_reranked_ivfpq_recovers_exact_top_k(tmp_path):
    """IVF-PQ's compressed scores lose the exact order; re-scoring its candidates from the stored
    vectors restores it (all candidates: exactly the flat result)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:20] + 0.3 * rng.standard_normal((20, 32)).astype(np.float32)
    s_flat, exact = retrieval.search(retrieval.build_index(x), q, 10)
    pq = retrieval.build_index(x, "ivfpq", nlist=16, nprobe=16, pq_m=4)
    retrieval.save_index(pq, tmp_path / "i.faiss")
    retrieval.save_rerank_vectors(x, tmp_path / "i.vectors.npy")
    plain = retrieval.load_index(tmp_path / "i.faiss")  # rerank=0: the index alone
    _, approx = retrieval.search(plain, q, 10)
    full = retrieval.load_index(tmp_path / "i.faiss", rerank=2000)
    s_re, reranked = retrieval.search(full, q, 10)
    assert isinstance(full, retrieval.Reranked)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall < 0.9  # the compressed codes alone do lose neighbours here
    # the same top-10 sets; float16 vectors may swap near-ties inside a row
    assert all(set(a) == set(b) for a, b in zip(reranked, exact))
    np.testing.assert_allclose(s_re, s_flat, atol=2e-3)
    few = retrieval.Reranked(pq, np.load(tmp_path / "i.vectors.npy", mmap_mode="r"), 100)
    _, ids = retrieval.search(few, q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]) > recall
    with pytest.raises(ValueError, match="re-ranking vectors"):
        retrieval.Reranked(pq, x[:5], 10)
