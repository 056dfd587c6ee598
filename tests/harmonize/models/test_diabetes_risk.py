"""The diabetes-risk model's index dates, outcome windows, training and prediction, on rows shaped
like its query's."""

from __future__ import annotations

from datetime import date

import numpy as np
import orjson
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from harmonize.models.diabetes_risk import FEATURES, compute, landmarks, train, training_set
from tests.support.diabetes import Patient, population, years

SCHEMA = {
    "patient_id": pl.String,
    "birth_date": pl.Date,
    "gender": pl.String,
    "deceased": pl.Boolean,
    "kind": pl.String,
    "value": pl.Float64,
    "day": pl.Date,
    "row_id": pl.String,
}


def frame(*patients: Patient) -> pl.DataFrame:
    return pl.DataFrame([row for p in patients for row in p.all()], schema=SCHEMA)


def test_the_index_is_the_earliest_complete_adult_day_and_features_come_from_on_or_before_it() -> None:
    p = Patient("a", born=date(1990, 6, 1))
    p.visit(date(2005, 1, 1), bmi=20)  # aged 14: not an index date
    p.visit(date(2010, 1, 1), bmi=30).add("bmi", date(2011, 1, 1), 50)  # a later BMI is not a feature
    p.add("hba1c", date(2013, 1, 1), 5.9).add("bmi", date(2016, 1, 1), 31)
    (row,) = training_set(frame(p)).iter_rows(named=True)
    assert (row["day"], row["bmi"], row["outcome"]) == (date(2010, 1, 1), 30.0, 1)
    assert row["age"] == pytest.approx(19.59, abs=0.01)


def test_a_feature_older_than_the_lookback_does_not_count() -> None:
    p = Patient("a").add("hdl", date(2006, 1, 1), 50).visit(date(2010, 1, 1))
    p.rows = [r for r in p.rows if not (r["kind"] == "hdl" and r["day"] == date(2010, 1, 1))]
    p.add("hdl", date(2011, 6, 1), 52).add("bmi", date(2017, 1, 1), 28)
    (row,) = training_set(frame(p)).iter_rows(named=True)
    assert (row["day"], row["hdl"]) == (date(2011, 6, 1), 52.0), "2006's HDL is over 3 years before 2010"


@pytest.mark.parametrize(
    ("outcome_at", "seen_until", "label"),
    [
        (0.0, 7, None),  # on the index day: had it already
        (-1.0, 7, None),  # before it
        (4.9, 5, 1),  # within five years
        (5.1, 7, 0),  # after the window, seen through it: not a case
        (None, 7, 0),
        (None, 4.9, None),  # not seen long enough to say
    ],
)
def test_the_outcome_window_is_strictly_after_the_index_for_five_years(
    outcome_at: float | None, seen_until: float, label: int | None
) -> None:
    start = date(2010, 1, 1)
    p = Patient("a").visit(start).add("bmi", years(start, seen_until), 27)
    if outcome_at is not None:
        p.add("diagnosis", years(start, outcome_at))
    got = training_set(frame(p))["outcome"].to_list()
    assert got == ([] if label is None else [label])


def test_an_hba1c_under_the_threshold_is_no_outcome() -> None:
    p = (
        Patient("a")
        .visit(date(2010, 1, 1))
        .add("hba1c", date(2012, 1, 1), 5.6)
        .add("bmi", date(2016, 1, 1), 27)
    )
    assert training_set(frame(p))["outcome"].to_list() == [0]


def test_training_is_deterministic_and_its_params_are_plain_json() -> None:
    rows = frame(*population(300))
    first, again = train(rows), train(rows)
    assert first.params == again.params and first.metrics == again.metrics
    assert orjson.loads(orjson.dumps(first.params)) == first.params
    data = training_set(rows)
    assert first.metrics["patients"] == len(data) == first.patients
    assert first.metrics["positives"] == data["outcome"].sum() >= 30
    assert first.metrics["folds"] == 5
    assert 0.7 < first.metrics["cv_roc_auc"] <= 1, "BMI and triglycerides carry the signal"
    coef = dict(zip(first.params["features"], first.params["coef"], strict=True))
    assert coef["bmi"] > 0.5 and abs(coef["systolic_bp"]) < coef["bmi"]


def test_predictions_equal_scikit_learns_own_and_survive_a_json_round_trip() -> None:
    rows = frame(*population(300))
    params = orjson.loads(orjson.dumps(train(rows).params))
    got = compute(rows, params).filter(pl.col("status") == "ok")
    data = training_set(rows)
    fitted = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0))
    fitted.fit(data.select(FEATURES).to_numpy(), data["outcome"].to_numpy())
    latest = (
        landmarks(rows).group_by("patient_id").last().join(got.select("patient_id", "value"), on="patient_id")
    )
    expected = fitted.predict_proba(latest.select(FEATURES).to_numpy())[:, 1]
    assert len(latest) == len(got) > 100
    np.testing.assert_allclose(latest["value"].to_numpy(), expected, rtol=1e-9)
    out = orjson.loads(got.row(0, named=True)["outputs"])
    assert out["horizon_years"] == 5 and out["as_of"] >= "2016-01-01", "predicted from the latest visit"


def test_prediction_refuses_the_dead_the_cases_and_the_incomplete_naming_why() -> None:
    params = train(frame(*population(300))).params
    start = date(2010, 1, 1)
    patients = [
        Patient("ok").visit(start),
        Patient("dead", deceased=True).visit(start),
        Patient("case").visit(start).add("hba1c", date(2012, 1, 1), 6.5),
        Patient("nolipids")
        .visit(start)
        .add("bmi", date(2015, 1, 1), 27)
        .add("systolic_bp", date(2015, 1, 1), 120),
        Patient("child", born=date(2000, 1, 1)).visit(start),
        Patient("nobody"),
        Patient("other", gender="other").visit(start),
    ]
    got = {r["patient_id"]: r for r in compute(frame(*patients), params).iter_rows(named=True)}
    assert got["ok"]["status"] == "ok" and 0 < got["ok"]["value"] < 1
    assert got["ok"]["inputs"][0] == "patient/ok" and len(got["ok"]["inputs"]) == 5
    reasons = {pid: r["reason"] for pid, r in got.items() if r["status"] == "refused"}
    assert reasons == {
        "dead": "the patient has died",
        "case": "has the outcome already (an HbA1c on 2012-01-01); the model predicts its onset",
        "nolipids": "no HDL cholesterol, triglycerides within 3 years up to 2015-01-01 "
        "(the latest measurement)",
        "child": "no BMI, blood pressure or lipids measured at 18 or over",
        "nobody": "no BMI, blood pressure or lipids measured at 18 or over",
        "other": "sex unknown: the model needs female or male",
    }
    assert "lab_result/case-hba1c-2012-01-01-4" in got["case"]["inputs"]


def test_too_few_cases_train_nothing_and_every_patient_is_refused_saying_so() -> None:
    rows = frame(*population(30))
    trained = train(rows)
    assert trained.params["fitted"] is False
    positives = int(trained.metrics["positives"])
    assert positives < 10
    assert trained.params["reason"].startswith(f"not trained: {positives} cases and ")
    out = compute(rows, trained.params)
    assert set(out["status"]) == {"refused"}
    assert out.filter(pl.col("reason").str.starts_with("not trained")).height > 0
