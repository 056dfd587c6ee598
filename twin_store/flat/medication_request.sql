-- One row per MedicationRequest, with the RxNorm code of the drug.
WITH r AS (
    SELECT id, from_json(resource, '{
        "status": "VARCHAR", "intent": "VARCHAR",
        "medicationCodeableConcept": {"coding": [{"system": "VARCHAR", "code": "VARCHAR",
                                                  "display": "VARCHAR"}], "text": "VARCHAR"},
        "medicationReference": {"reference": "VARCHAR"},
        "subject": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
        "authoredOn": "VARCHAR", "requester": {"reference": "VARCHAR"},
        "reasonReference": [{"reference": "VARCHAR"}],
        "dosageInstruction": [{"text": "VARCHAR", "asNeededBoolean": "BOOLEAN"}]
    }') AS m
    FROM resources
)
SELECT
    id AS medication_request_id,
    ref_id(m.subject.reference, 'Patient') AS patient_id,
    ref_id(m.encounter.reference, 'Encounter') AS encounter_id,
    m.status,
    m.intent,
    m.medicationCodeableConcept.coding[1].system AS medication_system,
    m.medicationCodeableConcept.coding[1].code AS medication_code,
    coalesce(m.medicationCodeableConcept.coding[1].display, m.medicationCodeableConcept.text)
        AS medication_display,
    ref_id(m.medicationReference.reference, 'Medication') AS medication_id,
    fhir_time(m.authoredOn) AS authored_at,
    ref_id(m.requester.reference, 'Practitioner') AS requester_id,
    ref_id(m.reasonReference[1].reference, 'Condition') AS reason_condition_id,
    m.dosageInstruction[1].text AS dosage_text,
    m.dosageInstruction[1].asNeededBoolean AS as_needed
FROM r
