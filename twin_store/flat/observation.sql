-- One row per Observation value: the observation's own value (component_index NULL) and one
-- row per component (e.g. systolic and diastolic of a blood pressure), LOINC code preferred.
WITH r AS (
    SELECT id, from_json(resource, '{
        "status": "VARCHAR",
        "category": [{"coding": [{"code": "VARCHAR"}]}],
        "code": {"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}],
                 "text": "VARCHAR"},
        "subject": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
        "effectiveDateTime": "VARCHAR", "effectivePeriod": {"start": "VARCHAR"},
        "effectiveInstant": "VARCHAR", "issued": "VARCHAR",
        "valueQuantity": {"value": "DOUBLE", "unit": "VARCHAR", "system": "VARCHAR", "code": "VARCHAR"},
        "valueCodeableConcept": {"coding": [{"system": "VARCHAR", "code": "VARCHAR",
                                             "display": "VARCHAR"}], "text": "VARCHAR"},
        "valueString": "VARCHAR", "valueBoolean": "BOOLEAN", "valueInteger": "BIGINT",
        "interpretation": [{"coding": [{"code": "VARCHAR"}]}],
        "component": [{
            "code": {"coding": [{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}],
                     "text": "VARCHAR"},
            "valueQuantity": {"value": "DOUBLE", "unit": "VARCHAR", "system": "VARCHAR",
                              "code": "VARCHAR"},
            "valueCodeableConcept": {"coding": [{"system": "VARCHAR", "code": "VARCHAR",
                                                 "display": "VARCHAR"}], "text": "VARCHAR"},
            "valueString": "VARCHAR"
        }]
    }') AS o
    FROM resources
), vals AS (
    SELECT
        id,
        ref_id(o.subject.reference, 'Patient') AS patient_id,
        ref_id(o.encounter.reference, 'Encounter') AS encounter_id,
        o.status,
        o.category[1].coding[1].code AS category,
        fhir_time(coalesce(o.effectiveDateTime, o.effectivePeriod.start, o.effectiveInstant))
            AS effective_at,
        fhir_time(o.issued) AS issued_at,
        o.interpretation[1].coding[1].code AS interpretation,
        len(coalesce(o.component, [])) AS components,
        unnest(
            [{'i': NULL::INTEGER, 'code': o.code, 'q': o.valueQuantity, 'cc': o.valueCodeableConcept,
              's': coalesce(o.valueString, o.valueBoolean::VARCHAR, o.valueInteger::VARCHAR),
              'n': o.valueInteger::DOUBLE}]
            || list_transform(coalesce(o.component, []), (c, i) -> {
                'i': i::INTEGER, 'code': c.code, 'q': c.valueQuantity, 'cc': c.valueCodeableConcept,
                's': c.valueString, 'n': NULL::DOUBLE})
        ) AS v
    FROM r
), coded AS (
    SELECT *, pick_coding(v.code.coding, 'http://loinc.org') AS coding FROM vals
    WHERE v.i IS NOT NULL OR v.q IS NOT NULL OR v.cc IS NOT NULL OR v.s IS NOT NULL
        OR components = 0
)
SELECT
    id AS observation_id,
    v.i AS component_index,
    patient_id,
    encounter_id,
    status,
    category,
    coding.system AS code_system,
    coding.code AS code,
    coalesce(coding.display, v.code.text) AS code_display,
    effective_at,
    issued_at,
    coalesce(v.q.value, v.n) AS value_numeric,
    v.q.unit AS value_unit,
    v.q.code AS value_ucum,
    v.cc.coding[1].system AS value_code_system,
    v.cc.coding[1].code AS value_code,
    coalesce(v.cc.coding[1].display, v.cc.text, v.s) AS value_text,
    interpretation
FROM coded
