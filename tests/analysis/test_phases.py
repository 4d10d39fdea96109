"""Two phases: n-gram statistics by hand, and the per-snapshot loss and KL curves against a brute-force
computation on the PyTorch model's own logits."""
import numpy as np
import pytest
import torch
import transformers

from crossjax.analysis import phases
from crossjax.errors import CrossjaxError

VOCAB = 24


def test_ngram_statistics_by_hand():
    ids = np.array([[1, 2, 1, 2, 3], [2, 1, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    s = phases.ngram_statistics(ids, mask, 5)
    np.testing.assert_allclose(s.unigram, [0, 3 / 7, 3 / 7, 1 / 7, 0])
    # pairs: 1->2, 2->1, 1->2, 2->3, 2->1: q(.|1) = {2: 1}, q(.|2) = {1: 2/3, 3: 1/3}, others back off to u
    np.testing.assert_allclose(s.rows(np.array([1, 2, 4])), [[0, 0, 1, 0, 0], [0, 2 / 3, 0, 1 / 3, 0],
                                                             [0, 3 / 7, 3 / 7, 1 / 7, 0]])
    h = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    np.testing.assert_allclose(s.bigram_entropy[[1, 2]], [0.0, h])
    assert s.bigram_entropy[4] == pytest.approx(s.unigram_entropy)
    with pytest.raises(CrossjaxError, match="vocab_size 3"):
        phases.ngram_statistics(ids, mask, 3)
    with pytest.raises(CrossjaxError, match="no token inside"):
        phases.ngram_statistics(ids, np.zeros_like(mask), 5)


def _snapshot(seed, tmp_path):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3 * seed)         # snapshot 0: the init; later ones further from it
    path = tmp_path / f"step{10 ** seed}"
    model.save_pretrained(path)
    return model, path


def _brute_force(model, ids, mask, stats):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(ids).long(),
                                       attention_mask=torch.from_numpy(mask).long()).logits, -1).double().numpy()
    out = {"loss": [], "kl_unigram": [], "kl_bigram": []}
    u = stats.unigram
    for c in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not (mask[c, t] and mask[c, t + 1]):
                continue
            p = logp[c, t]
            q = stats.rows(np.array([ids[c, t]]))[0]
            out["loss"].append(-p[ids[c, t + 1]])
            out["kl_unigram"].append(np.sum(u[u > 0] * (np.log(u[u > 0]) - p[u > 0])))
            out["kl_bigram"].append(np.sum(q[q > 0] * (np.log(q[q > 0]) - p[q > 0])))
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_curves_equal_a_brute_force_pass_over_the_torch_logits(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, VOCAB, size=(40, 12))
    stats = phases.ngram_statistics(train, np.ones_like(train, bool), VOCAB)
    ids = rng.integers(0, VOCAB, size=(5, 12)).astype(np.int32)
    mask = np.arange(12)[None] < np.array([12, 9, 12, 4, 7])[:, None]
    snaps = [_snapshot(seed, tmp_path) for seed in range(3)]
    curves = phases.phase_curves({p.name: p for _, p in snaps}, (ids, mask), stats, batch_size=2)
    assert list(curves) == ["step1", "step10", "step100"]
    for model, path in snaps:
        want = _brute_force(model, ids, mask, stats)
        got = curves[path.name]
        assert got["pairs"] == int((mask[:, :-1] & mask[:, 1:]).sum())
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=2e-4, abs=2e-5), (path.name, key)
        assert got["kl_unigram"] >= 0 and got["kl_bigram"] >= 0


def test_transition_is_the_snapshot_closest_to_the_bigram_statistics():
    curves = {"step0": {"kl_unigram": 2.0, "kl_bigram": 3.0}, "step64": {"kl_unigram": 0.1, "kl_bigram": 1.0},
              "step512": {"kl_unigram": 0.4, "kl_bigram": 0.2}, "step4000": {"kl_unigram": 0.9, "kl_bigram": 0.6}}
    out = phases.transition(curves)
    assert out["snapshot"] == "step512" and out["step"] == 512 and out["closest_to_unigram"] == "step64"
    assert phases.transition({"a": {"kl_unigram": 1, "kl_bigram": 1}})["step"] is None
