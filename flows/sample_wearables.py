"""A synthetic Fitabase export (Fitbit CSVs) for the demo: a few twins' heart rate each minute,
hourly steps, nights of sleep and weighings, so one store joins their EHR with a wearable.

Deterministic for a seed; each account belongs to one of the given patients (the demo maps the
accounts to the EHR's Patient ids in the source's `patients`).
"""

from __future__ import annotations

import csv
import math
import random
from datetime import date, datetime, timedelta
from pathlib import Path

LOCAL = "%-m/%-d/%Y %-I:%M:%S %p"


def write_sample_wearables(
    folder: Path, patients: list[str], *, last_day: date, days: int = 14, seed: int = 7
) -> dict[str, str]:
    """Write the export into `folder`; returns the account Id -> Patient id map."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    accounts = {str(1_000_000_000 + rng.randrange(9_000_000_000)): patient for patient in patients}
    first = last_day - timedelta(days=days - 1)
    with (
        (folder / "heartrate_seconds_merged.csv").open("w", newline="") as heart,
        (folder / "hourlySteps_merged.csv").open("w", newline="") as steps,
        (folder / "sleepDay_merged.csv").open("w", newline="") as sleep,
        (folder / "weightLogInfo_merged.csv").open("w", newline="") as weight,
    ):
        heart_out, steps_out, sleep_out, weight_out = (csv.writer(f) for f in (heart, steps, sleep, weight))
        heart_out.writerow(["Id", "Time", "Value"])
        steps_out.writerow(["Id", "ActivityHour", "StepTotal"])
        sleep_out.writerow(["Id", "SleepDay", "TotalSleepRecords", "TotalMinutesAsleep", "TotalTimeInBed"])
        weight_out.writerow(
            ["Id", "Date", "WeightKg", "WeightPounds", "Fat", "BMI", "IsManualReport", "LogId"]
        )
        for account in accounts:
            resting = rng.uniform(52, 74)
            kg, metres = rng.uniform(55, 105), rng.uniform(1.55, 1.92)
            for n in range(days):
                day = first + timedelta(days=n)
                midnight = datetime(day.year, day.month, day.day)
                # Resting overnight, up by day, a short workout some evenings; the last days run high.
                fever = 8 if n >= days - 2 and account == next(iter(accounts)) else 0
                workout = 18 * 60 + rng.randrange(120) if rng.random() < 0.5 else -1
                for minute in range(24 * 60):
                    awake = 7 * 60 <= minute < 23 * 60
                    bpm = resting + fever + (14 if awake else 0) + 6 * math.sin(minute / 90) + rng.gauss(0, 3)
                    if 0 <= minute - workout < 40:
                        bpm += 55
                    heart_out.writerow(
                        [account, (midnight + timedelta(minutes=minute)).strftime(LOCAL), round(bpm)]
                    )
                for hour in range(24):
                    walked = 0 if hour < 7 or hour > 22 else max(0, round(rng.gauss(550, 300)))
                    steps_out.writerow([account, (midnight + timedelta(hours=hour)).strftime(LOCAL), walked])
                asleep = round(rng.gauss(420, 40))
                sleep_out.writerow(
                    [account, midnight.strftime(LOCAL), 1, asleep, asleep + rng.randrange(10, 40)]
                )
                if n % 3 == 0:
                    kg += rng.gauss(0, 0.3)
                    when = midnight + timedelta(hours=7, minutes=rng.randrange(60))
                    pounds, log_id = round(kg * 2.20462, 1), int(when.timestamp() * 1000)
                    weight_out.writerow(
                        [
                            account,
                            when.strftime(LOCAL),
                            round(kg, 1),
                            pounds,
                            "",
                            round(kg / metres**2, 2),
                            "True",
                            log_id,
                        ]
                    )
    return accounts
