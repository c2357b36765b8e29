"""PolynomialVectorizer: terms, names, values and analytic derivatives."""

import numpy as np
import pytest

from astra_cannon import PolynomialVectorizer
from astra_cannon.vectorizer import parse_terms


def test_quadratic_has_constant_linear_and_all_pairs():
    vec = PolynomialVectorizer(["A", "B", "C"], 2)
    assert vec.n_terms == 1 + 3 + 6
    assert vec.human_readable_label_terms[:4] == ["1", "A", "B", "C"]
    assert set(vec.human_readable_label_terms[4:]) == {"A^2", "A*B", "A*C", "B^2", "B*C", "C^2"}


@pytest.mark.parametrize("n_labels,order,expected", [(17, 2, 171), (4, 3, 35), (2, 4, 15)])
def test_term_count_matches_binomial(n_labels, order, expected):
    vec = PolynomialVectorizer([f"L{i}" for i in range(n_labels)], order)
    assert vec.n_terms == expected


def test_label_vector_values_match_explicit_products():
    vec = PolynomialVectorizer(["A", "B"], 3)
    x = np.array([[0.3, -1.7], [2.0, 0.5]])
    v = vec.get_label_vector(x)
    assert v.shape == (vec.n_terms, 2)
    for k, name in enumerate(vec.human_readable_label_terms):
        expr = name.replace("^", "**").replace("A", "a").replace("B", "b")
        for n, (a, b) in enumerate(x):
            assert v[k, n] == pytest.approx(eval(expr, {"a": a, "b": b}), rel=1e-14)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_derivative_matches_finite_differences(order):
    vec = PolynomialVectorizer(["A", "B", "C", "D"], order)
    rng = np.random.default_rng(0)
    x = rng.normal(size=4)
    d = vec.get_label_vector_derivative(x)
    h = 1e-6
    for i in range(4):
        e = np.zeros(4)
        e[i] = h
        num = (vec.get_label_vector(x + e)[:, 0] - vec.get_label_vector(x - e)[:, 0]) / (2 * h)
        np.testing.assert_allclose(d[:, i], num, rtol=1e-7, atol=1e-8)
    many = vec.get_label_vector_derivative(np.vstack([x, x]))
    assert many.shape == (2, vec.n_terms, 4)
    np.testing.assert_array_equal(many[1], d)


def test_term_string_parsing_and_round_trip():
    vec = PolynomialVectorizer(["TEFF", "LOGG"], terms="TEFF + LOGG + TEFF^2 + LOGG*TEFF")
    assert vec.human_readable_label_terms == ["1", "TEFF", "LOGG", "TEFF^2", "TEFF*LOGG"]
    again = PolynomialVectorizer.from_dict(vec.to_dict())
    assert again == vec


@pytest.mark.parametrize("text", ["TEFF + NOPE", "TEFF + TEFF", "TEFF + "])
def test_bad_term_strings_raise(text):
    with pytest.raises(ValueError):
        parse_terms(text, ["TEFF", "LOGG"])


def test_wrong_label_count_raises():
    vec = PolynomialVectorizer(["A", "B"], 2)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        vec.get_label_vector(np.zeros((3, 3)))
