"""ASCVD risk: the ACC/AHA Pooled Cohort Equations (harmonize.models.ascvd) on each twin's latest risk
factors.

Per patient: the latest total cholesterol, HDL and systolic blood pressure (alone or from a blood
pressure panel), the latest smoking status, diabetes (a diabetes Condition not resolved), treated
hypertension (an active MedicationRequest of a blood-pressure-lowering drug), sex, race and the
age on the day of the latest of those measurements, so the same snapshot always gives the same
answer. What counts as each input lives in `ascvd_inputs.toml`. A patient missing an input, or
outside the equations' validated range, is refused with the reason, never given a number.
"""

from __future__ import annotations

import tomllib
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from harmonize.models.ascvd import PceInputs, Race, Refusal, Sex, ten_year_risk
from harmonize.models.twin_model import FhirOutput, TwinModel, output_frame

CODES = tomllib.loads(Path(__file__).with_name("ascvd_inputs.toml").read_text())


def _in(codes: list[str]) -> str:
    return ", ".join("'" + c.replace("'", "''") + "'" for c in codes)


QUERY = f"""
WITH people AS (
    SELECT id AS patient_id, birth_date, gender, race_code, deceased, deceased_at
    FROM patient WHERE id IN (FROM scope_patients)),
labs AS (
    SELECT patient_id, code, value_numeric, value_ucum, 'lab_result/' || id AS row_id,
           try_cast(effective AS TIMESTAMPTZ) AS taken_at
    FROM lab_result
    WHERE code IN ({_in(CODES["total_cholesterol"] + CODES["hdl"])}) AND value_numeric IS NOT NULL
      AND patient_id IN (FROM scope_patients)),
sbp AS (
    SELECT patient_id, value_numeric, 'observation_component/' || id AS row_id,
           try_cast(effective AS TIMESTAMPTZ) AS taken_at
    FROM observation_component
    WHERE component_code IN ({_in(CODES["systolic_bp"])}) AND value_numeric IS NOT NULL
      AND patient_id IN (FROM scope_patients)
    UNION ALL
    SELECT patient_id, value_numeric, 'vital_sign/' || id, try_cast(effective AS TIMESTAMPTZ)
    FROM vital_sign
    WHERE code IN ({_in(CODES["systolic_bp"])}) AND value_numeric IS NOT NULL
      AND patient_id IN (FROM scope_patients)),
smoking AS (
    SELECT patient_id, value_code, 'observation/' || id AS row_id,
           try_cast(effective AS TIMESTAMPTZ) AS taken_at
    FROM observation
    WHERE code IN ({_in(CODES["smoking_status"])}) AND patient_id IN (FROM scope_patients)),
diabetes AS (
    SELECT patient_id, list('condition/' || id) AS row_ids FROM condition
    WHERE code IN ({_in(CODES["diabetes"])})
      AND coalesce(clinical_status, 'active') NOT IN ('resolved', 'inactive')
      AND patient_id IN (FROM scope_patients)
    GROUP BY patient_id),
treated AS (
    SELECT patient_id, list('medication_request/' || id) AS row_ids FROM medication_request
    WHERE status = 'active'
      AND regexp_matches(lower(medication_display), '{"|".join(CODES["antihypertensives"])}')
      AND patient_id IN (FROM scope_patients)
    GROUP BY patient_id),
latest AS (
    SELECT p.patient_id,
        (SELECT struct_pack(v := value_numeric, u := value_ucum, id := row_id, taken := taken_at) FROM labs l
         WHERE l.patient_id = p.patient_id AND l.code IN ({_in(CODES["total_cholesterol"])})
         ORDER BY taken_at DESC NULLS LAST, row_id LIMIT 1) AS tc,
        (SELECT struct_pack(v := value_numeric, u := value_ucum, id := row_id, taken := taken_at) FROM labs l
         WHERE l.patient_id = p.patient_id AND l.code IN ({_in(CODES["hdl"])})
         ORDER BY taken_at DESC NULLS LAST, row_id LIMIT 1) AS hdl,
        (SELECT struct_pack(v := value_numeric, id := row_id, taken := taken_at) FROM sbp s
         WHERE s.patient_id = p.patient_id ORDER BY taken_at DESC NULLS LAST, row_id LIMIT 1) AS sbp,
        (SELECT struct_pack(v := value_code, id := row_id, taken := taken_at) FROM smoking s
         WHERE s.patient_id = p.patient_id ORDER BY taken_at DESC NULLS LAST, row_id LIMIT 1) AS smoking
    FROM people p)
SELECT p.patient_id, p.birth_date, p.gender, p.race_code, p.deceased, p.deceased_at,
       l.tc.v AS total_cholesterol, l.tc.u AS total_cholesterol_unit, l.hdl.v AS hdl,
       l.hdl.u AS hdl_unit,
       l.sbp.v AS systolic_bp, l.smoking.v AS smoking_code,
       d.patient_id IS NOT NULL AS diabetes, t.patient_id IS NOT NULL AS treated,
       CAST(greatest(l.tc.taken, l.hdl.taken, l.sbp.taken) AS DATE) AS as_of,
       list_filter([l.tc.id, l.hdl.id, l.sbp.id, l.smoking.id], x -> x IS NOT NULL)
           || coalesce(d.row_ids, []) || coalesce(t.row_ids, []) AS inputs
FROM people p JOIN latest l USING (patient_id)
LEFT JOIN diabetes d USING (patient_id) LEFT JOIN treated t USING (patient_id)
ORDER BY p.patient_id
"""


def compute(rows: pl.DataFrame, params: dict[str, Any] | None = None) -> pl.DataFrame:
    """Each patient's 10-year risk (a fraction) or the refusal."""
    out = []
    for row in rows.iter_rows(named=True):
        inputs, refused = _inputs(row)
        result = ten_year_risk(inputs) if not refused else Refusal(reasons=tuple(refused))
        base = {"patient_id": row["patient_id"], "inputs": row["inputs"]}
        if isinstance(result, Refusal):
            reason = "; ".join(result.reasons)
            out.append(base | {"status": "refused", "value": None, "outputs": None, "reason": reason})
            continue
        outputs = {
            "risk_percent": round(100 * result.risk, 2),
            "equations": result.equations,
            "individual_sum": result.individual_sum,
            "age_years": inputs.age_years,
            "as_of": row["as_of"].isoformat() if row["as_of"] else None,
        }
        text = orjson.dumps(outputs).decode()
        out.append(base | {"status": "ok", "value": result.risk, "outputs": text, "reason": None})
    return output_frame(out)


def _inputs(row: dict[str, Any]) -> tuple[PceInputs, list[str]]:
    """The equations' inputs from a row of QUERY, and refusals the equations cannot see (a
    death, a cholesterol in a unit other than mg/dL)."""
    refused = []
    if row["deceased"] or row["deceased_at"]:
        refused.append("the patient has died")
    for name, unit in (("total_cholesterol", "total cholesterol"), ("hdl", "HDL cholesterol")):
        if row[name] is not None and (row[f"{name}_unit"] or "mg/dL") != "mg/dL":
            refused.append(f"{unit} is not in mg/dL; add its conversion to lab_units.toml")
    smoking = row["smoking_code"]
    as_of: date | None = row["as_of"]
    born: date | None = row["birth_date"] if isinstance(row["birth_date"], date) else _date(row["birth_date"])
    age = None
    if as_of and born:
        age = as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))
    sex: Sex | None = row["gender"] if row["gender"] in ("female", "male") else None
    inputs = PceInputs(
        age_years=age,
        sex=sex,
        race=_race(row["race_code"]),
        total_cholesterol_mg_dl=row["total_cholesterol"],
        hdl_mg_dl=row["hdl"],
        systolic_bp_mm_hg=row["systolic_bp"],
        treated_for_hypertension=row["treated"],
        current_smoker=None
        if smoking is None or smoking in CODES["smoking_unknown"]
        else smoking in CODES["current_smoker"],
        diabetes=row["diabetes"],
    )
    return inputs, refused


def _race(code: str | None) -> Race | None:
    if code is None:
        return None
    return (
        "african-american" if code in CODES["african_american"] else "white" if code == "2106-3" else "other"
    )


def _date(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text[:10]) if text else None
    except ValueError:
        return None


MODEL = TwinModel(
    name="ascvd-pce",
    version="1.0.0",
    description="10-year risk of a first hard ASCVD event (ACC/AHA Pooled Cohort Equations, Goff 2013)",
    reads=(
        "patient",
        "lab_result",
        "observation_component",
        "vital_sign",
        "observation",
        "condition",
        "medication_request",
    ),
    scope="patient",
    query=QUERY,
    compute=compute,
    fhir=FhirOutput(resource="RiskAssessment", outcome="First hard ASCVD event within 10 years"),
)
