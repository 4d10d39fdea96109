"""correlate(): Pearson and Spearman r with p-values over the features that emerge and were scored; the others
are left out and counted."""
import numpy as np
import pytest

from crossjax.complexity import Score
from crossjax.complexity.correlation import correlate
from crossjax.errors import CrossjaxError


def scores(values):
    return [Score(f, c, "", "offline") if c is not None else Score(f, None, "", "offline", error="no answer")
            for f, c in enumerate(values)]


STEPS = [0, 2, 16, 128, 1000, 4000, 10000, 60000]
COMPLEXITY = [1, 1, 2, 2, 3, 3, 4, 5]


def test_rising_complexity_correlates():
    out = correlate(dict(enumerate(STEPS)), scores(COMPLEXITY))
    assert out["features"] == 8 and out["never_emerged"] == 0 and out["failed"] == 0 and out["note"] is None
    assert out["pearson_r"] == pytest.approx(np.corrcoef(STEPS, COMPLEXITY)[0, 1])
    assert out["spearman_r"] == pytest.approx(np.corrcoef(np.argsort(np.argsort(STEPS)),
                                                          [0.5, 0.5, 2.5, 2.5, 4.5, 4.5, 6, 7])[0, 1])
    assert out["spearman_p"] < 0.01 and out["pearson_p"] < 0.05


def test_log_steps_change_pearson_not_spearman():
    linear = correlate(STEPS, scores(COMPLEXITY))
    logged = correlate(STEPS, scores(COMPLEXITY), log_steps=True)
    assert logged["pearson_r"] == pytest.approx(np.corrcoef(np.log10(1 + np.array(STEPS)), COMPLEXITY)[0, 1])
    assert logged["pearson_r"] != pytest.approx(linear["pearson_r"])
    assert logged["spearman_r"] == pytest.approx(linear["spearman_r"]) and logged["steps"] == "log10(1+step)"


def test_unrelated_scores_do_not_correlate():
    rng = np.random.default_rng(0)
    steps = rng.integers(0, 100000, size=200)
    out = correlate(list(steps), scores(rng.integers(1, 6, size=200).tolist()))
    assert abs(out["pearson_r"]) < 0.2 and out["pearson_p"] > 0.05 and out["features"] == 200


def test_never_emerged_and_failed_are_left_out_and_counted():
    steps = {0: 0, 1: 10, 2: 100, 3: None, 4: 1000, 5: 5000}
    out = correlate(steps, scores([1, 2, None, 5, 3, 4]))
    assert (out["features"], out["never_emerged"], out["failed"]) == (4, 1, 1)
    assert out["spearman_r"] == pytest.approx(1.0)
    as_array = correlate(np.array([0, 10, 100, -1, 1000, 5000]), scores([1, 2, None, 5, 3, 4]))
    assert as_array == out


def test_too_few_or_constant_give_no_r_and_say_why():
    few = correlate([0, 10], scores([1, 2]))
    assert few["pearson_r"] is None and few["spearman_p"] is None and "at least 3" in few["note"]
    flat = correlate([0, 10, 100], scores([2, 2, 2]))
    assert flat["pearson_r"] is None and "same complexity" in flat["note"]


def test_bad_input_is_an_error():
    with pytest.raises(CrossjaxError, match="feature 2 has a score but no entry"):
        correlate([0, 10], scores([1, 2, 3]))
    with pytest.raises(CrossjaxError, match="more than one score"):
        correlate([0, 10], scores([1, 2]) * 2)
    with pytest.raises(CrossjaxError, match="must map feature"):
        correlate(5, scores([1]))
    with pytest.raises(CrossjaxError, match="steps must be numbers"):
        correlate({0: "late"}, scores([1]))
