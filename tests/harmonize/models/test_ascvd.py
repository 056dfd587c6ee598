"""The Pooled Cohort Equations against the guideline's worked example, their refusals, and the
properties the equations have (and, where an interaction term breaks one, that it is broken)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harmonize.models.ascvd import (
    EQUATIONS,
    PCE_FILE,
    RANGES,
    PceInputs,
    Refusal,
    Risk,
    load_pce,
    ten_year_risk,
)

EXAMPLE = PceInputs(
    age_years=55,
    sex="female",
    race="white",
    total_cholesterol_mg_dl=213,
    hdl_mg_dl=50,
    systolic_bp_mm_hg=120,
    treated_for_hypertension=False,
    current_smoker=False,
    diabetes=False,
)
"""The guideline's worked example: Goff DC Jr, Lloyd-Jones DM, et al. 2013 ACC/AHA Guideline on the
Assessment of Cardiovascular Risk. Circulation 2014;129(25 Suppl 2):S49-S73, Appendix 7, Table A:
55 years, total cholesterol 213 mg/dL, HDL 50 mg/dL, untreated systolic BP 120 mm Hg, nonsmoker,
no diabetes."""

TABLE_A = {
    ("female", "white"): (-29.67, 7, 2.1),
    ("female", "african-american"): (86.16, 6, 3.0),
    ("male", "white"): (60.69, 6, 5.3),
    ("male", "african-american"): (18.97, 4, 6.1),
}
"""(sex, race) -> Table A's printed individual sum, how many of its coefficient x value cells are
nonzero for the example, and its estimated 10-year risk in percent. The model gives 2.05%, 3.03%,
5.38% and 6.07%: Table A's 5.3% for white men comes from its rounded cells (the ACC estimator
and bcjaeger/PooledCohort give 5.4%), hence the 0.1 tolerance."""


def risk_of(inputs: PceInputs) -> Risk:
    result = ten_year_risk(inputs)
    assert isinstance(result, Risk), result
    return result


def refusal_of(inputs: PceInputs) -> Refusal:
    result = ten_year_risk(inputs)
    assert isinstance(result, Refusal), result
    return result


@pytest.mark.parametrize(("sex", "race"), list(TABLE_A))
def test_reproduces_the_worked_example_of_the_guideline(sex: Any, race: Any) -> None:
    paper_sum, cells, paper_percent = TABLE_A[sex, race]
    got = risk_of(replace(EXAMPLE, sex=sex, race=race))
    assert abs(100 * got.risk - paper_percent) <= 0.1
    # Table A prints each coefficient x value cell to two decimals (off by at most 0.005) and the sum
    # of the printed cells to two decimals again, so it may be off the exact sum by 0.005 per cell + 1.
    assert abs(got.individual_sum - paper_sum) <= 0.005 * (cells + 1)


@pytest.mark.parametrize(
    ("change", "percents"),
    [
        ({"treated_for_hypertension": True}, (2.8, 4.6, 6.3, 9.9)),
        ({"current_smoker": True}, (5.0, 5.9, 10.0, 10.3)),
    ],
)
def test_treated_and_smoking_terms_match_an_independent_implementation(
    change: dict[str, bool], percents: tuple[float, ...]
) -> None:
    """The worked example covers neither the treated-SBP nor the smoking terms. These percents are
    bcjaeger/PooledCohort's test values for the same profile (computed with the ACC workbook's
    4-5 digit coefficients), one decimal, in TABLE_A's order."""
    for (sex, race), expected in zip(TABLE_A, percents, strict=True):
        got = risk_of(replace(EXAMPLE, sex=sex, race=race, **change))
        assert abs(100 * got.risk - expected) <= 0.1, (sex, race)


@pytest.mark.parametrize("sex", ["female", "male"])
def test_other_races_use_the_white_equations(sex: Any) -> None:
    other = risk_of(replace(EXAMPLE, sex=sex, race="other"))
    assert other == risk_of(replace(EXAMPLE, sex=sex, race="white"))
    assert other.equations == f"white_{sex}"


OUTSIDE = [
    ("age_years", 39, "age is below the validated range 40-79 years"),
    ("age_years", 80, "age is above the validated range 40-79 years"),
    ("total_cholesterol_mg_dl", 129.9, "total cholesterol is below the validated range 130-320 mg/dL"),
    ("total_cholesterol_mg_dl", 320.5, "total cholesterol is above the validated range 130-320 mg/dL"),
    ("hdl_mg_dl", 19.5, "HDL cholesterol is below the validated range 20-100 mg/dL"),
    ("hdl_mg_dl", 101, "HDL cholesterol is above the validated range 20-100 mg/dL"),
    ("systolic_bp_mm_hg", 89, "systolic blood pressure is below the validated range 90-200 mm Hg"),
    ("systolic_bp_mm_hg", 200.1, "systolic blood pressure is above the validated range 90-200 mm Hg"),
    (
        "total_cholesterol_mg_dl",
        float("nan"),
        "total cholesterol is not a number; the equations need 130-320",
    ),
    ("hdl_mg_dl", float("inf"), "HDL cholesterol is not a number; the equations need 20-100 mg/dL"),
    ("age_years", None, "age is missing; the equations need it (40-79 years)"),
    ("total_cholesterol_mg_dl", None, "total cholesterol is missing; the equations need it (130-320 mg/dL)"),
    ("hdl_mg_dl", None, "HDL cholesterol is missing; the equations need it (20-100 mg/dL)"),
    ("systolic_bp_mm_hg", None, "systolic blood pressure is missing; the equations need it (90-200 mm Hg)"),
    ("sex", None, "sex is missing; the equations need female or male"),
    ("sex", "unknown", "sex is not female or male; the equations need female or male"),
    ("race", None, "race is missing; the equations need white, african-american or other"),
    ("race", "asian", "race is not one the equations know; the equations need white, african-american"),
    ("treated_for_hypertension", None, "antihypertensive treatment is missing; the equations need yes or no"),
    ("current_smoker", None, "current smoking status is missing; the equations need yes or no"),
    ("diabetes", None, "diabetes status is missing; the equations need yes or no"),
]


@pytest.mark.parametrize(("field", "value", "reason"), OUTSIDE)
def test_refuses_a_missing_or_out_of_range_input_naming_it(field: str, value: Any, reason: str) -> None:
    refused = refusal_of(replace(EXAMPLE, **{field: value}))
    assert len(refused.reasons) == 1
    assert refused.reasons[0].startswith(reason)


def test_refusal_lists_every_bad_input_one_line_each_and_no_values() -> None:
    refused = refusal_of(
        replace(
            EXAMPLE,
            age_years=87,
            total_cholesterol_mg_dl=None,
            hdl_mg_dl=123.4,
            sex=None,
            current_smoker=None,
        )
    )
    assert [r.split(" is ")[0] for r in refused.reasons] == [
        "age",
        "total cholesterol",
        "HDL cholesterol",
        "sex",
        "current smoking status",
    ]
    assert all("\n" not in r for r in refused.reasons)
    # A refusal may be logged: it says which input and which side of the range, never the value.
    assert not any("87" in r or "123" in r for r in refused.reasons)


def test_diabetes_and_smoking_together_match_an_independent_implementation() -> None:
    """No worked example has diabetes. bcjaeger/PooledCohort's test (test-predict_10yr_ascvd_risk.R,
    "some additional random examples work"): a white man of 54, smoker with diabetes, total
    cholesterol 170, HDL 50, untreated systolic BP 157: 20.8%."""
    got = risk_of(
        PceInputs(
            age_years=54,
            sex="male",
            race="white",
            total_cholesterol_mg_dl=170,
            hdl_mg_dl=50,
            systolic_bp_mm_hg=157,
            treated_for_hypertension=False,
            current_smoker=True,
            diabetes=True,
        )
    )
    assert round(100 * got.risk, 1) == 20.8


def workbook_risk(inputs: PceInputs, group: str) -> float:
    """The guideline's formula (Goff et al. 2013, Appendix 7, Table A: risk = 1 - S10 ^ exp(sum of
    coefficient x value - mean)) written out term by term with WORKBOOK's coefficients: an
    implementation and a coefficient source that share nothing with the model's."""
    assert inputs.age_years and inputs.total_cholesterol_mg_dl and inputs.hdl_mg_dl
    assert inputs.systolic_bp_mm_hg
    w = WORKBOOK[group]
    age, tc = math.log(inputs.age_years), math.log(inputs.total_cholesterol_mg_dl)
    hdl, sbp = math.log(inputs.hdl_mg_dl), math.log(inputs.systolic_bp_mm_hg)
    treated = "treated" if inputs.treated_for_hypertension else "untreated"
    smoker, diabetes = float(bool(inputs.current_smoker)), float(bool(inputs.diabetes))
    total = (
        w.get("ln_age", 0) * age
        + w.get("ln_age_squared", 0) * age**2
        + w.get("ln_total_cholesterol", 0) * tc
        + w.get("ln_age_x_ln_total_cholesterol", 0) * age * tc
        + w.get("ln_hdl", 0) * hdl
        + w.get("ln_age_x_ln_hdl", 0) * age * hdl
        + w.get(f"ln_{treated}_sbp", 0) * sbp
        + w.get(f"ln_age_x_ln_{treated}_sbp", 0) * age * sbp
        + w.get("current_smoker", 0) * smoker
        + w.get("ln_age_x_current_smoker", 0) * age * smoker
        + w.get("diabetes", 0) * diabetes
    )
    return 1 - w["baseline_survival"] ** math.exp(total - w["mean_sum"])


@pytest.mark.parametrize(("sex", "race"), list(TABLE_A))
@pytest.mark.parametrize("corner", range(16))
def test_accepts_the_range_boundaries_and_scores_them_as_the_workbook_does(
    sex: Any, race: Any, corner: int
) -> None:
    """Every combination of the four ranges' low and high ends (40 and 79 years, 130 and 320 ...),
    with and without treatment, smoking and diabetes: far from the worked example, where a wrong
    term (a treated coefficient for an untreated SBP, a missing interaction) shows most. The
    model's coefficients are the workbook's rounded to Table A's digits, which moves a risk by
    at most 1% of itself at these corners; a wrong term moves it by far more."""
    ends = {field: RANGES[field][(corner >> bit) & 1] for bit, field in enumerate(sorted(RANGES))}
    ends["age_years"] = int(ends["age_years"])
    for treated, smoker, diabetes in itertools.product((False, True), repeat=3):
        inputs = replace(
            EXAMPLE,
            sex=sex,
            race=race,
            treated_for_hypertension=treated,
            current_smoker=smoker,
            diabetes=diabetes,
            **ends,
        )
        got = risk_of(inputs)
        expected = workbook_risk(inputs, got.equations)
        assert got.risk == pytest.approx(expected, rel=0.015), (treated, smoker, diabetes)


def test_a_bad_coefficient_file_fails_naming_the_group_and_term() -> None:
    text = PCE_FILE.read_text()
    no_term = text.replace("ln_age_x_ln_hdl = 1.769\n", "")
    with pytest.raises(ValueError, match=r"\[equations.white_male\] lacks ln_age_x_ln_hdl"):
        load_pce(no_term)
    no_group = text.replace("[equations.african_american_male]", "[equations.black_male]")
    with pytest.raises(ValueError, match=r"\[equations.african_american_male\] is missing"):
        load_pce(no_group)
    no_range = text.replace("hdl_mg_dl = [20, 100]\n", "")
    with pytest.raises(ValueError, match=r"\[ranges\] lacks hdl_mg_dl"):
        load_pce(no_range)


WORKBOOK = {
    "white_female": {
        "ln_age": -29.799,
        "ln_age_squared": 4.884,
        "ln_total_cholesterol": 13.54,
        "ln_age_x_ln_total_cholesterol": -3.114,
        "ln_hdl": -13.578,
        "ln_age_x_ln_hdl": 3.149,
        "ln_treated_sbp": 2.019,
        "ln_untreated_sbp": 1.957,
        "current_smoker": 7.574,
        "ln_age_x_current_smoker": -1.665,
        "diabetes": 0.661,
        "mean_sum": -29.1817,
        "baseline_survival": 0.96652,
    },
    "african_american_female": {
        "ln_age": 17.1141,
        "ln_total_cholesterol": 0.9396,
        "ln_hdl": -18.9196,
        "ln_age_x_ln_hdl": 4.4748,
        "ln_treated_sbp": 29.2907,
        "ln_age_x_ln_treated_sbp": -6.4321,
        "ln_untreated_sbp": 27.8197,
        "ln_age_x_ln_untreated_sbp": -6.0873,
        "current_smoker": 0.6908,
        "diabetes": 0.8738,
        "mean_sum": 86.6081,
        "baseline_survival": 0.95334,
    },
    "white_male": {
        "ln_age": 12.344,
        "ln_total_cholesterol": 11.853,
        "ln_age_x_ln_total_cholesterol": -2.664,
        "ln_hdl": -7.99,
        "ln_age_x_ln_hdl": 1.769,
        "ln_treated_sbp": 1.797,
        "ln_untreated_sbp": 1.764,
        "current_smoker": 7.837,
        "ln_age_x_current_smoker": -1.795,
        "diabetes": 0.658,
        "mean_sum": 61.1816,
        "baseline_survival": 0.91436,
    },
    "african_american_male": {
        "ln_age": 2.469,
        "ln_total_cholesterol": 0.302,
        "ln_hdl": -0.307,
        "ln_treated_sbp": 1.916,
        "ln_untreated_sbp": 1.809,
        "current_smoker": 0.549,
        "diabetes": 0.645,
        "mean_sum": 19.5425,
        "baseline_survival": 0.89536,
    },
}
"""The ACC workbook's values as cerner/ascvd-risk-calculator (app/load_fhir_data.js) carries them,
a source independent of the TOML's; terms not listed are not in that equation (0)."""


@pytest.mark.parametrize("group", list(WORKBOOK))
def test_coefficients_agree_with_the_acc_workbook_to_the_printed_digits(group: Any) -> None:
    """Table A prints coefficients to 3 decimals, baseline survival to 4 and the mean to 2: each of
    the TOML's numbers must be the workbook's rounded to those digits (catches a mistyped digit
    that the worked example is too coarse to notice)."""
    workbook = WORKBOOK[group]
    eq = EQUATIONS[group]
    for term, coefficient in eq.coefficients.items():
        assert abs(coefficient - workbook.get(term, 0.0)) <= 0.0005, term
    assert abs(eq.baseline_survival - workbook["baseline_survival"]) <= 0.00005
    assert abs(eq.mean_sum - workbook["mean_sum"]) <= 0.005


# Properties over the whole validated range. Which monotonicity properties hold follows from the
# sign of the derivative of the individual sum (risk rises with it) over the validated box:
# - systolic BP: coefficient + age-interaction x ln age > 0 in every group (lowest: African-American
#   women at 79, 27.820 - 6.087 ln 79 = 1.2 untreated, 1.2 treated), so risk always rises with SBP;
# - total cholesterol: 13.540 - 3.114 ln age for white women turns negative above 77.3 years, so for
#   white (and other) women aged 78-79 risk FALLS as cholesterol rises; it rises in every other case;
# - age: rises for men at every profile (white men: 12.344 - 2.664 ln 320 + 1.769 ln 20 - 1.795 > 0),
#   but not for women: white women with high cholesterol and low HDL, and African-American women with
#   high SBP and low HDL, get a lower risk as they age. Only what holds is tested as a property;
#   test_interaction_terms_break_monotonicity_where_the_coefficients_say pins the exceptions.
SEXES = st.sampled_from(["female", "male"])


def profiles(sex: st.SearchStrategy[Any] = SEXES) -> st.SearchStrategy[PceInputs]:
    return st.builds(
        PceInputs,
        age_years=st.integers(40, 79),
        sex=sex,
        race=st.sampled_from(["white", "african-american", "other"]),
        total_cholesterol_mg_dl=st.floats(130, 320),
        hdl_mg_dl=st.floats(20, 100),
        systolic_bp_mm_hg=st.floats(90, 200),
        treated_for_hypertension=st.booleans(),
        current_smoker=st.booleans(),
        diabetes=st.booleans(),
    )


def rises(low: PceInputs, high: PceInputs) -> bool:
    """Risk at `high` is not below risk at `low`, beyond floating-point rounding."""
    return risk_of(high).risk >= risk_of(low).risk * (1 - 1e-12)


@settings(max_examples=500, deadline=None)
@given(profiles())
def test_risk_is_a_probability_strictly_between_0_and_1(inputs: PceInputs) -> None:
    assert 0 < risk_of(inputs).risk < 1


@settings(max_examples=300, deadline=None)
@given(profiles(), st.floats(90, 200), st.floats(90, 200))
def test_risk_never_falls_as_systolic_bp_rises(inputs: PceInputs, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert rises(replace(inputs, systolic_bp_mm_hg=low), replace(inputs, systolic_bp_mm_hg=high))


@settings(max_examples=300, deadline=None)
@given(profiles(), st.floats(130, 320), st.floats(130, 320))
def test_risk_never_falls_as_cholesterol_rises_except_white_women_over_77(
    inputs: PceInputs, a: float, b: float
) -> None:
    assume(not (inputs.sex == "female" and inputs.race != "african-american" and inputs.age_years >= 78))
    low, high = sorted((a, b))
    assert rises(replace(inputs, total_cholesterol_mg_dl=low), replace(inputs, total_cholesterol_mg_dl=high))


@settings(max_examples=300, deadline=None)
@given(profiles(sex=st.just("male")), st.integers(40, 79), st.integers(40, 79))
def test_risk_never_falls_as_a_man_ages(inputs: PceInputs, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert rises(replace(inputs, age_years=low), replace(inputs, age_years=high))


@pytest.mark.parametrize(
    ("inputs", "field", "low", "high"),
    [
        # white woman aged 79: more cholesterol, less risk (13.540 - 3.114 ln 79 < 0)
        (replace(EXAMPLE, age_years=79), "total_cholesterol_mg_dl", 130, 320),
        # white woman, smoker, cholesterol 320, HDL 20: older, less risk
        (
            replace(EXAMPLE, current_smoker=True, total_cholesterol_mg_dl=320, hdl_mg_dl=20),
            "age_years",
            40,
            45,
        ),
        # African-American woman, treated SBP 200, HDL 20: older, less risk
        (
            replace(
                EXAMPLE,
                race="african-american",
                systolic_bp_mm_hg=200,
                hdl_mg_dl=20,
                treated_for_hypertension=True,
            ),
            "age_years",
            40,
            79,
        ),
    ],
)
def test_interaction_terms_break_monotonicity_where_the_coefficients_say(
    inputs: PceInputs, field: str, low: float, high: float
) -> None:
    """The published equations do this; an implementation that did not would not be theirs."""
    assert risk_of(replace(inputs, **{field: high})).risk < risk_of(replace(inputs, **{field: low})).risk
