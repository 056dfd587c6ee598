"""A synthetic population for the diabetes-risk model's tests: patients with known risk factors."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import numpy as np


class Patient:
    """A patient's rows, added measurement by measurement."""

    def __init__(
        self, pid: str, born: date = date(1960, 1, 1), gender: str = "female", deceased: bool = False
    ):
        self.head = {"patient_id": pid, "birth_date": born, "gender": gender, "deceased": deceased}
        self.rows: list[dict[str, Any]] = []

    def add(self, kind: str, day: date, value: float | None = None) -> Patient:
        ident = f"{TABLE[kind]}/{self.head['patient_id']}-{kind}-{day}-{len(self.rows)}"
        self.rows.append(self.head | {"kind": kind, "value": value, "day": day, "row_id": ident})
        return self

    def visit(
        self, day: date, bmi: float = 27, sbp: float = 125, hdl: float = 55, tg: float = 140
    ) -> Patient:
        for kind, value in (("bmi", bmi), ("systolic_bp", sbp), ("hdl", hdl), ("triglycerides", tg)):
            self.add(kind, day, value)
        return self

    def all(self) -> list[dict[str, Any]]:
        return self.rows or [self.head | {"kind": None, "value": None, "day": None, "row_id": None}]


def population(n: int, seed: int = 7) -> list[Patient]:
    """Patients seen at an index visit and six years on; the chance of dysglycaemia in between
    rises with BMI and triglycerides. Cases have an HbA1c of 6.1 % three years on (the others
    5.2 %, under the threshold)."""
    rng = np.random.default_rng(seed)
    people = []
    for i in range(n):
        start = date(2010, 1, 1) + timedelta(days=int(rng.integers(0, 365)))
        born = date(int(rng.integers(1945, 1985)), int(rng.integers(1, 13)), 1)
        bmi, sbp, hdl, tg = rng.normal(28, 4), rng.normal(125, 15), rng.normal(55, 12), rng.normal(140, 40)
        case = rng.random() < 1 / (1 + np.exp(-(-2.0 + 0.35 * (bmi - 28) + 0.015 * (tg - 140))))
        p = Patient(f"p{i:03d}", born, "male" if rng.random() < 0.5 else "female").visit(
            start, bmi, sbp, hdl, tg
        )
        p.add("hba1c", years(start, 3), 6.1 if case else 5.2)
        p.visit(years(start, 6), bmi + rng.normal(0, 1), sbp, hdl, tg)
        people.append(p)
    return people


TABLE = {
    "bmi": "vital_sign",
    "systolic_bp": "observation_component",
    "hdl": "lab_result",
    "triglycerides": "lab_result",
    "hba1c": "lab_result",
    "diagnosis": "condition",
}


def years(day: date, n: float) -> date:
    return day + timedelta(days=round(365.25 * n))
