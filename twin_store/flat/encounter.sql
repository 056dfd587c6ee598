-- One row per Encounter: who, when, what kind and why.
WITH r AS (
    SELECT id, from_json(resource, '{
        "status": "VARCHAR", "class": {"system": "VARCHAR", "code": "VARCHAR"},
        "type": [{"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}],
                  "text": "VARCHAR"}],
        "subject": {"reference": "VARCHAR"},
        "period": {"start": "VARCHAR", "end": "VARCHAR"},
        "reasonCode": [{"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}]}],
        "serviceProvider": {"reference": "VARCHAR"},
        "participant": [{"individual": {"reference": "VARCHAR"}}]
    }') AS e
    FROM resources
)
SELECT
    id AS encounter_id,
    ref_id(e.subject.reference, 'Patient') AS patient_id,
    e.status,
    e.class.code AS class_code,
    e.type[1].coding[1].system AS type_system,
    e.type[1].coding[1].code AS type_code,
    coalesce(e.type[1].coding[1].display, e.type[1].text) AS type_display,
    fhir_time(e.period.start) AS period_start,
    fhir_time(e.period."end") AS period_end,
    e.reasonCode[1].coding[1].system AS reason_system,
    e.reasonCode[1].coding[1].code AS reason_code,
    e.reasonCode[1].coding[1].display AS reason_display,
    ref_id(e.serviceProvider.reference, 'Organization') AS organization_id,
    ref_id(e.participant[1].individual.reference, 'Practitioner') AS practitioner_id
FROM r
