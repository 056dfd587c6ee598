-- One row per Immunization, with its CVX vaccine code.
WITH r AS (
    SELECT id, from_json(resource, '{
        "status": "VARCHAR",
        "vaccineCode": {"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}],
                        "text": "VARCHAR"},
        "patient": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
        "occurrenceDateTime": "VARCHAR", "primarySource": "BOOLEAN"
    }') AS i
    FROM resources
)
SELECT
    id AS immunization_id,
    ref_id(i.patient.reference, 'Patient') AS patient_id,
    ref_id(i.encounter.reference, 'Encounter') AS encounter_id,
    i.status,
    i.vaccineCode.coding[1].system AS vaccine_system,
    i.vaccineCode.coding[1].code AS vaccine_code,
    coalesce(i.vaccineCode.coding[1].display, i.vaccineCode.text) AS vaccine_display,
    fhir_time(i.occurrenceDateTime) AS occurred_at,
    i.primarySource AS primary_source
FROM r
