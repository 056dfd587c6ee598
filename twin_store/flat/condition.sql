-- One row per Condition (problem or diagnosis), with its SNOMED/ICD code.
WITH r AS (
    SELECT id, from_json(resource, '{
        "clinicalStatus": {"coding": [{"code": "VARCHAR"}]},
        "verificationStatus": {"coding": [{"code": "VARCHAR"}]},
        "category": [{"coding": [{"code": "VARCHAR"}]}],
        "code": {"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}],
                 "text": "VARCHAR"},
        "subject": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
        "onsetDateTime": "VARCHAR", "abatementDateTime": "VARCHAR", "recordedDate": "VARCHAR"
    }') AS c
    FROM resources
)
SELECT
    id AS condition_id,
    ref_id(c.subject.reference, 'Patient') AS patient_id,
    ref_id(c.encounter.reference, 'Encounter') AS encounter_id,
    c.clinicalStatus.coding[1].code AS clinical_status,
    c.verificationStatus.coding[1].code AS verification_status,
    c.category[1].coding[1].code AS category,
    c.code.coding[1].system AS code_system,
    c.code.coding[1].code AS code,
    coalesce(c.code.coding[1].display, c.code.text) AS code_display,
    fhir_time(c.onsetDateTime) AS onset_at,
    fhir_time(c.abatementDateTime) AS abatement_at,
    fhir_time(c.recordedDate) AS recorded_at
FROM r
