"""The index's activation sums are exact: the same limbs (and float64) whatever the order or grouping of the terms
(what lets sums split over processes equal one process's), and the true sum to float64 rounding."""
from fractions import Fraction

import numpy as np

from crossjax.analysis import exact_sum


def test_sums_do_not_depend_on_the_order_or_grouping_and_are_exact():
    rng = np.random.default_rng(0)
    n = 6
    terms = [np.concatenate([rng.standard_normal(n - 2) * 10.0 ** rng.integers(-40, 37), [1e-45, 3e38]])
             .astype(np.float32) for _ in range(300)]  # signs mixed, subnormal to near the largest float32
    whole = exact_sum.zeros(n)
    for t in terms:
        exact_sum.add(whole, t)
    first, second = exact_sum.zeros(n), exact_sum.zeros(n)
    for t in terms[:113]:
        exact_sum.add(first, t)
    for t in reversed(terms[113:]):
        exact_sum.add(second, t)
    np.testing.assert_array_equal(exact_sum.normalise(first + second), whole)
    got = exact_sum.to_float64(whole)
    for i in range(n):
        truth = sum(Fraction(float(t[i])) for t in terms)
        assert abs(Fraction(float(got[i])) - truth) <= abs(truth) * Fraction(1, 2 ** 50)
    # the float64 of the regrouped sum has the same bits (a float64 running sum would not promise that)
    assert exact_sum.to_float64(exact_sum.normalise(first + second)).tobytes() == got.tobytes()
    assert exact_sum.to_float64(exact_sum.zeros(2)).tolist() == [0.0, 0.0]
