-- One row per Procedure, with its SNOMED code and when it was performed.
WITH r AS (
    SELECT id, from_json(resource, '{
        "status": "VARCHAR",
        "code": {"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}],
                 "text": "VARCHAR"},
        "subject": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
        "performedDateTime": "VARCHAR",
        "performedPeriod": {"start": "VARCHAR", "end": "VARCHAR"},
        "reasonReference": [{"reference": "VARCHAR"}]
    }') AS p
    FROM resources
)
SELECT
    id AS procedure_id,
    ref_id(p.subject.reference, 'Patient') AS patient_id,
    ref_id(p.encounter.reference, 'Encounter') AS encounter_id,
    p.status,
    p.code.coding[1].system AS code_system,
    p.code.coding[1].code AS code,
    coalesce(p.code.coding[1].display, p.code.text) AS code_display,
    fhir_time(coalesce(p.performedDateTime, p.performedPeriod.start)) AS performed_start,
    fhir_time(p.performedPeriod."end") AS performed_end,
    ref_id(p.reasonReference[1].reference, 'Condition') AS reason_condition_id
FROM r
