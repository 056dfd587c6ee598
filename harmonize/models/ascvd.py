"""ACC/AHA Pooled Cohort Equations (Goff et al. 2013): 10-year risk of a first hard ASCVD event.

`ten_year_risk` gives a number only for the inputs the equations were validated on; otherwise it
refuses with one line per missing or out-of-range input, naming it and the valid range, so a twin
never shows a risk extrapolated from a profile the cohorts did not cover. Refusal lines carry no
patient values (they may be logged), only which input and which side of the range.

Race: "other" uses the equations for white people, as the guideline advises for groups other
than African-American and non-Hispanic white (section 4.1, recommendation 2); `Risk.equations`
says which set was used.

The coefficients, baseline survivals, means and ranges live in `ascvd_pce.toml` (the guideline's
Table A), read once per process. Pure otherwise.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

PCE_FILE = Path(__file__).with_name("ascvd_pce.toml")

Sex = Literal["female", "male"]
Race = Literal["white", "african-american", "other"]
EquationSet = Literal["white_female", "african_american_female", "white_male", "african_american_male"]
TERMS = (
    "ln_age",
    "ln_age_squared",
    "ln_total_cholesterol",
    "ln_age_x_ln_total_cholesterol",
    "ln_hdl",
    "ln_age_x_ln_hdl",
    "ln_treated_sbp",
    "ln_age_x_ln_treated_sbp",
    "ln_untreated_sbp",
    "ln_age_x_ln_untreated_sbp",
    "current_smoker",
    "ln_age_x_current_smoker",
    "diabetes",
)
GROUPS: dict[tuple[Sex, bool], EquationSet] = {
    ("female", False): "white_female",
    ("female", True): "african_american_female",
    ("male", False): "white_male",
    ("male", True): "african_american_male",
}
"""(sex, African-American?) -> equation set; white and other use the white equations."""
MEASURES = {
    "age_years": ("age", "years"),
    "total_cholesterol_mg_dl": ("total cholesterol", "mg/dL"),
    "hdl_mg_dl": ("HDL cholesterol", "mg/dL"),
    "systolic_bp_mm_hg": ("systolic blood pressure", "mm Hg"),
}
"""Numeric inputs with a validated range: field -> (name in a refusal, unit)."""
FLAGS = {
    "treated_for_hypertension": "antihypertensive treatment",
    "current_smoker": "current smoking status",
    "diabetes": "diabetes status",
}


@dataclass(frozen=True, kw_only=True)
class PceInputs:
    """One person's risk factors; None where the twin has no value. Age in completed years
    (as the guideline and its calculator take it), cholesterol in mg/dL, systolic BP in mm Hg."""

    age_years: int | None
    sex: Sex | None
    race: Race | None
    total_cholesterol_mg_dl: float | None
    hdl_mg_dl: float | None
    systolic_bp_mm_hg: float | None
    treated_for_hypertension: bool | None
    current_smoker: bool | None
    diabetes: bool | None


@dataclass(frozen=True, kw_only=True)
class Equation:
    coefficients: dict[str, float]
    mean_sum: float
    baseline_survival: float


@dataclass(frozen=True, kw_only=True)
class Risk:
    risk: float
    """10-year risk as a fraction in (0, 1), unrounded; the guideline prints it as a percent."""
    equations: EquationSet
    individual_sum: float
    """The sum of coefficient x value (Table A's "Individual Sum"), for checking and lineage."""


@dataclass(frozen=True, kw_only=True)
class Refusal:
    reasons: tuple[str, ...]
    """One line per missing or out-of-range input, naming it and what the equations accept."""


def load_pce(text: str) -> tuple[dict[EquationSet, Equation], dict[str, tuple[float, float]]]:
    """The equations and validated ranges of an `ascvd_pce.toml` text; ValueError naming what is
    wrong when a group or range is missing or a group lacks a term, so a bad edit fails at start."""
    data: dict[str, Any] = tomllib.loads(text)
    equations: dict[EquationSet, Equation] = {}
    for group in get_args(EquationSet):
        spec = data.get("equations", {}).get(group)
        if spec is None:
            raise ValueError(f"{PCE_FILE.name}: [equations.{group}] is missing")
        if missing := [t for t in (*TERMS, "mean_sum", "baseline_survival") if t not in spec]:
            raise ValueError(f"{PCE_FILE.name}: [equations.{group}] lacks {', '.join(missing)} (0 if N/A)")
        equations[group] = Equation(
            coefficients={t: float(spec[t]) for t in TERMS},
            mean_sum=float(spec["mean_sum"]),
            baseline_survival=float(spec["baseline_survival"]),
        )
    ranges = data.get("ranges", {})
    if missing := [m for m in MEASURES if m not in ranges]:
        raise ValueError(f"{PCE_FILE.name}: [ranges] lacks {', '.join(missing)}")
    return equations, {m: (float(ranges[m][0]), float(ranges[m][1])) for m in MEASURES}


EQUATIONS, RANGES = load_pce(PCE_FILE.read_text())


def ten_year_risk(inputs: PceInputs) -> Risk | Refusal:
    """The 10-year hard-ASCVD risk, or a refusal listing every input that is missing or outside
    the validated range (never a number then)."""
    reasons = [*_range_refusals(inputs), *_category_refusals(inputs)]
    if reasons:
        return Refusal(reasons=tuple(reasons))
    # The refusals above guarantee every input is present; the asserts tell mypy so.
    assert inputs.age_years is not None and inputs.total_cholesterol_mg_dl is not None
    assert inputs.hdl_mg_dl is not None and inputs.systolic_bp_mm_hg is not None
    assert inputs.sex is not None
    group = GROUPS[inputs.sex, inputs.race == "african-american"]
    eq = EQUATIONS[group]
    ln_age = math.log(inputs.age_years)
    ln_tc = math.log(inputs.total_cholesterol_mg_dl)
    ln_hdl = math.log(inputs.hdl_mg_dl)
    ln_sbp = math.log(inputs.systolic_bp_mm_hg)
    treated, smoker = bool(inputs.treated_for_hypertension), bool(inputs.current_smoker)
    values = {
        "ln_age": ln_age,
        "ln_age_squared": ln_age * ln_age,
        "ln_total_cholesterol": ln_tc,
        "ln_age_x_ln_total_cholesterol": ln_age * ln_tc,
        "ln_hdl": ln_hdl,
        "ln_age_x_ln_hdl": ln_age * ln_hdl,
        "ln_treated_sbp": ln_sbp if treated else 0.0,
        "ln_age_x_ln_treated_sbp": ln_age * ln_sbp if treated else 0.0,
        "ln_untreated_sbp": 0.0 if treated else ln_sbp,
        "ln_age_x_ln_untreated_sbp": 0.0 if treated else ln_age * ln_sbp,
        "current_smoker": 1.0 if smoker else 0.0,
        "ln_age_x_current_smoker": ln_age if smoker else 0.0,
        "diabetes": 1.0 if inputs.diabetes else 0.0,
    }
    individual_sum = math.fsum(eq.coefficients[t] * values[t] for t in TERMS)
    # 1 - S10^exp(sum - mean), written with expm1 so small risks keep their digits.
    risk = -math.expm1(math.exp(individual_sum - eq.mean_sum) * math.log(eq.baseline_survival))
    return Risk(risk=risk, equations=group, individual_sum=individual_sum)


def _range_refusals(inputs: PceInputs) -> list[str]:
    reasons = []
    for field, (name, unit) in MEASURES.items():
        value: float | None = getattr(inputs, field)
        low, high = RANGES[field]
        valid = f"{low:g}-{high:g} {unit}"
        if value is None:
            reasons.append(f"{name} is missing; the equations need it ({valid})")
        elif not math.isfinite(value):
            reasons.append(f"{name} is not a number; the equations need {valid}")
        elif value < low:
            reasons.append(f"{name} is below the validated range {valid}")
        elif value > high:
            reasons.append(f"{name} is above the validated range {valid}")
    return reasons


def _category_refusals(inputs: PceInputs) -> list[str]:
    reasons = []
    if inputs.sex not in get_args(Sex):
        state = "missing" if inputs.sex is None else "not female or male"
        reasons.append(f"sex is {state}; the equations need female or male")
    if inputs.race not in get_args(Race):
        state = "missing" if inputs.race is None else "not one the equations know"
        need = "white, african-american or other (scored as white)"
        reasons.append(f"race is {state}; the equations need {need}")
    for field, name in FLAGS.items():
        if getattr(inputs, field) is None:
            reasons.append(f"{name} is missing; the equations need yes or no")
    return reasons
