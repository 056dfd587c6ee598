"""Diabetes risk: a logistic regression, trained on the store's own patients, of the chance of
prediabetes or diabetes within 5 years, from age, sex, BMI, systolic blood pressure, HDL and
triglycerides (the risk factors of the Framingham Offspring diabetes score, Wilson et al. 2007,
less fasting glucose and family history, see below).

The outcome: the first HbA1c at or over 5.7 % (ADA's prediabetes threshold), or the onset of a
prediabetes or diabetes diagnosis. The index date T: in training, each patient's earliest day, at
18 or over, on which every feature has been measured within the 3 years up to and including T;
in prediction, the patient's latest day with a measurement (now, for that patient). Features come
only from on or before T and the outcome window is strictly after it, (T, T + 5 years]: a patient
with the outcome on or before T has it already (left out of training, refused in prediction). In
training a patient is a case if the outcome falls in the window, a non-case if not and they were
seen (any measurement) on or after T + 5 years, and unknown otherwise (left out: too short a
follow-up to say). Glucose and HbA1c are not features: in the store's data they are measured
once dysglycaemia is suspected, so whether one was taken tells the outcome's work-up, not the
patient's risk, and an HbA1c at 5.7 % is the outcome itself.

Why prediabetes too: on the shared Synthea export diabetes alone (HbA1c >= 6.5 % or a diabetes
diagnosis) gives 2 new cases among 355 patients with a known outcome, too few to fit six
coefficients or to measure how well they fit; with prediabetes, 11 among 218. The
outcome, features and windows are data (`diabetes_risk.toml`): with more patients, HbA1c 6.5 %
and the diabetes codes alone give the diabetes outcome.

`train` fits scaling and the regression with scikit-learn and stores what it fitted as numbers
(means, scales, coefficients, intercept), with the cross-validated ROC AUC; `compute` predicts
from those numbers alone, so a stored training is read back without unpickling anything.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl

from harmonize.models.twin_model import FhirOutput, Trained, TwinModel, output_frame

CONFIG = tomllib.loads(Path(__file__).with_name("diabetes_risk.toml").read_text())
OUTCOME, TRAINING, SOURCES = CONFIG["outcome"], CONFIG["training"], CONFIG["features"]
HORIZON, LOOKBACK, ADULT = int(CONFIG["horizon_years"]), int(CONFIG["lookback_years"]), CONFIG["adult_age"]
MEASURED = tuple(SOURCES)
FEATURES = ("age", "male", *MEASURED)
NAMES = {
    "bmi": "BMI",
    "systolic_bp": "systolic blood pressure",
    "hdl": "HDL cholesterol",
    "triglycerides": "triglycerides",
}


def _in(codes: list[str]) -> str:
    return ", ".join("'" + c.replace("'", "''") + "'" for c in codes)


def _measure(kind: str, spec: dict[str, Any]) -> str:
    table, unit = spec["table"], spec["unit"].replace("'", "''")
    select = f"""SELECT patient_id, '{kind}' AS kind, value_numeric AS value,
               try_cast(left(effective, 10) AS DATE) AS day, '{{table}}/' || id AS row_id
        FROM {{table}}
        WHERE {{code}} IN ({_in(spec["codes"])}) AND value_numeric IS NOT NULL
          AND coalesce(value_ucum, '{unit}') = '{unit}' AND patient_id IN (FROM scope_patients)"""
    parts = [select.format(table=table, code="code")]
    if spec.get("components"):
        parts.append(select.format(table="observation_component", code="component_code"))
    return "\n    UNION ALL ".join(parts)


QUERY = f"""
WITH people AS (
    SELECT id AS patient_id, try_cast(birth_date AS DATE) AS birth_date, gender,
           coalesce(deceased, false) OR deceased_at IS NOT NULL AS deceased
    FROM patient WHERE id IN (FROM scope_patients)),
measured AS (
    SELECT * FROM (
        {" UNION ALL ".join(_measure(kind, spec) for kind, spec in SOURCES.items())}
        UNION ALL
        SELECT patient_id, 'hba1c', value_numeric, try_cast(left(effective, 10) AS DATE), 'lab_result/' || id
        FROM lab_result
        WHERE code IN ({_in(OUTCOME["hba1c"])}) AND value_numeric IS NOT NULL
          AND coalesce(value_ucum, '%') = '%' AND patient_id IN (FROM scope_patients)
        UNION ALL
        SELECT patient_id, 'diagnosis', NULL, try_cast(left(coalesce(onset, recorded_date), 10) AS DATE),
               'condition/' || id
        FROM condition
        WHERE code IN ({_in(OUTCOME["conditions"])})
          AND coalesce(verification_status, '') NOT IN ('refuted', 'entered-in-error')
          AND patient_id IN (FROM scope_patients))
    WHERE day IS NOT NULL)
SELECT p.patient_id, p.birth_date, p.gender, p.deceased, m.kind, m.value, m.day, m.row_id
FROM people p LEFT JOIN measured m USING (patient_id)
ORDER BY p.patient_id, m.day, m.kind, m.row_id
"""


# -- from rows to landmarks --------------------------------------------------------------------


def _people(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per patient: demographics, the first outcome (day and row) and the last day seen."""
    people = rows.select("patient_id", "birth_date", "gender", "deceased").unique("patient_id", keep="first")
    measured = rows.filter(pl.col("kind").is_not_null())
    is_outcome = (pl.col("kind") == "diagnosis") | (
        (pl.col("kind") == "hba1c") & (pl.col("value") >= OUTCOME["hba1c_at_least"])
    )
    events = (
        measured.filter(is_outcome)
        .sort("day", "row_id")
        .group_by("patient_id")
        .agg(pl.col("day").first().alias("outcome_day"), pl.col("row_id").first().alias("outcome_id"))
    )
    seen = measured.group_by("patient_id").agg(pl.col("day").max().alias("last_seen"))
    return people.join(events, on="patient_id", how="left").join(seen, on="patient_id", how="left")


def landmarks(rows: pl.DataFrame) -> pl.DataFrame:
    """Each patient's candidate index dates (the adult days with a feature measured) and the
    features as of each: the latest value of each within the lookback up to and including the
    day (a day's several values averaged), with the ids of the rows used."""
    people = _people(rows)
    daily = (
        rows.filter(pl.col("kind").is_in(MEASURED))
        .group_by("patient_id", "kind", "day")
        .agg(pl.col("value").mean(), pl.col("row_id").sort().alias("ids"))
    )
    days = (
        daily.select("patient_id", "day")
        .unique()
        .join(people, on="patient_id")
        .with_columns(age=(pl.col("day") - pl.col("birth_date")).dt.total_days() / 365.25)
        .filter(pl.col("age") >= ADULT)
        .with_columns(male=pl.col("gender").replace_strict({"male": 1.0, "female": 0.0}, default=None))
        .sort("day")
    )
    tolerance = f"{round(LOOKBACK * 365.25)}d"
    for kind in MEASURED:
        values = (
            daily.filter(pl.col("kind") == kind)
            .select("patient_id", "day", pl.col("value").alias(kind), pl.col("ids").alias(f"{kind}_ids"))
            .sort("day")
        )
        # Both sides are sorted on day (polars cannot check it within the patient groups).
        days = days.join_asof(
            values,
            on="day",
            by="patient_id",
            strategy="backward",
            tolerance=tolerance,
            check_sortedness=False,
        )
    return days.with_columns(complete=pl.all_horizontal(pl.col(FEATURES).is_not_null())).sort(
        "patient_id", "day"
    )


def training_set(rows: pl.DataFrame) -> pl.DataFrame:
    """Per patient with a known outcome: the features at the earliest complete index date and
    `outcome` (1: in the window after it; 0: seen event-free through the window)."""
    first = landmarks(rows).filter("complete").group_by("patient_id").first()
    end = pl.col("day").dt.offset_by(f"{HORIZON}y")
    return (
        first.filter(pl.col("outcome_day").is_null() | (pl.col("outcome_day") > pl.col("day")))
        .with_columns(outcome=(pl.col("outcome_day") <= end).fill_null(False))
        .filter(pl.col("outcome") | (pl.col("last_seen") >= end))
        .with_columns(pl.col("outcome").cast(pl.Int8))
        .sort("patient_id")
    )


# -- training and prediction -------------------------------------------------------------------


def train(rows: pl.DataFrame) -> Trained:
    """Fit on every patient with a known outcome; too few cases or non-cases: no fit (`compute`
    then refuses everyone, saying why)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = training_set(rows)
    x, y = data.select(FEATURES).to_numpy().astype(float), data["outcome"].to_numpy()
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    counts = {"patients": float(len(y)), "positives": float(positives)}
    if positives < TRAINING["min_positives"] or negatives < TRAINING["min_negatives"]:
        reason = (
            f"not trained: {positives} cases and {negatives} non-cases with a known outcome; "
            f"training needs {TRAINING['min_positives']} and {TRAINING['min_negatives']}"
        )
        return Trained(params={"fitted": False, "reason": reason}, metrics=counts, patients=len(y))

    def pipeline() -> Any:
        regression = LogisticRegression(C=TRAINING["c"], max_iter=1000, random_state=TRAINING["random_state"])
        return make_pipeline(StandardScaler(), regression)

    folds = StratifiedKFold(
        n_splits=min(TRAINING["folds"], positives, negatives),
        shuffle=True,
        random_state=TRAINING["random_state"],
    )
    auc = cross_val_score(pipeline(), x, y, cv=folds, scoring="roc_auc")
    fitted = pipeline().fit(x, y)
    scaler, regression = fitted[0], fitted[-1]
    params = {
        "fitted": True,
        "features": list(FEATURES),
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": regression.coef_[0].tolist(),
        "intercept": float(regression.intercept_[0]),
        "horizon_years": HORIZON,
        "outcome": OUTCOME["text"],
    }
    metrics = counts | {
        "cv_roc_auc": float(auc.mean()),
        "cv_roc_auc_sd": float(auc.std()),
        "folds": float(folds.get_n_splits()),
    }
    return Trained(params=params, metrics=metrics, patients=len(y))


def probability(features: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The fitted pipeline's predicted probability, from its stored numbers."""
    z = (features - np.asarray(params["mean"])) / np.asarray(params["scale"])
    return np.asarray(1.0 / (1.0 + np.exp(-(z @ np.asarray(params["coef"]) + params["intercept"]))))


def compute(rows: pl.DataFrame, params: dict[str, Any] | None) -> pl.DataFrame:
    """Each patient's probability of the outcome within the horizon after their latest
    measurement day, or the refusal."""
    people = _people(rows).sort("patient_id")
    latest = landmarks(rows).group_by("patient_id").last()
    people = people.join(latest.drop(people.columns[1:]), on="patient_id", how="left")
    fitted = bool(params and params.get("fitted"))
    if params and fitted:
        ready = people.filter(pl.col("complete").fill_null(False))
        chance = probability(ready.select(FEATURES).to_numpy().astype(float), params)
        people = people.join(
            ready.select("patient_id").with_columns(p=pl.Series(chance)), on="patient_id", how="left"
        )
    out = []
    for row in people.iter_rows(named=True):
        ids = [i for kind in MEASURED for i in (row.get(f"{kind}_ids") or [])]
        base = {"patient_id": row["patient_id"], "inputs": [f"patient/{row['patient_id']}", *ids]}
        reason = _refusal(row) or (None if fitted else str((params or {}).get("reason", "not trained")))
        if reason:
            if row["outcome_id"]:
                base["inputs"].append(row["outcome_id"])
            out.append(base | {"status": "refused", "value": None, "outputs": None, "reason": reason})
            continue
        outputs = {
            "risk_percent": round(100 * row["p"], 2),
            "horizon_years": HORIZON,
            "outcome": OUTCOME["text"],
            "as_of": row["day"].isoformat(),
            "age_years": round(row["age"], 1),
            "sex": row["gender"],
        } | {kind: round(row[kind], 2) for kind in MEASURED}
        text = orjson.dumps(outputs).decode()
        out.append(base | {"status": "ok", "value": row["p"], "reason": None, "outputs": text})
    return output_frame(out)


def _refusal(row: dict[str, Any]) -> str | None:
    if row["deceased"]:
        return "the patient has died"
    if row["outcome_day"] is not None:
        how = "a diagnosis" if str(row["outcome_id"]).startswith("condition/") else "an HbA1c"
        return f"has the outcome already ({how} on {row['outcome_day']}); the model predicts its onset"
    if row["birth_date"] is None:
        return "no birth date"
    if row["day"] is None:
        return f"no BMI, blood pressure or lipids measured at {ADULT} or over"
    if row["male"] is None:
        return "sex unknown: the model needs female or male"
    if missing := [NAMES[kind] for kind in MEASURED if row[kind] is None]:
        return f"no {', '.join(missing)} within {LOOKBACK} years up to {row['day']} (the latest measurement)"
    return None


MODEL = TwinModel(
    name="diabetes-risk",
    version="1.0.0",
    description=f"{CONFIG['outcome']['text']} within {HORIZON} years (logistic regression, trained here)",
    reads=("patient", "vital_sign", "observation_component", "lab_result", "condition"),
    scope="population",
    query=QUERY,
    compute=compute,
    fhir=FhirOutput(resource="RiskAssessment", outcome=f"{OUTCOME['text']} within {HORIZON} years"),
    train=train,
    retrain_after=50,
)
