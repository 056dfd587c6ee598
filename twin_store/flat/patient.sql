-- One row per Patient: demographics an analyst filters and groups by.
WITH r AS (
    SELECT id, from_json(resource, '{
        "active": "BOOLEAN", "gender": "VARCHAR", "birthDate": "VARCHAR",
        "deceasedDateTime": "VARCHAR", "deceasedBoolean": "BOOLEAN",
        "name": [{"use": "VARCHAR", "family": "VARCHAR", "given": ["VARCHAR"]}],
        "identifier": [{"system": "VARCHAR", "value": "VARCHAR",
                        "type": {"coding": [{"code": "VARCHAR"}]}}],
        "address": [{"city": "VARCHAR", "state": "VARCHAR", "postalCode": "VARCHAR",
                     "country": "VARCHAR"}],
        "maritalStatus": {"coding": [{"code": "VARCHAR"}]},
        "extension": [{"url": "VARCHAR", "extension": [{"url": "VARCHAR",
                       "valueCoding": {"code": "VARCHAR", "display": "VARCHAR"}}]}]
    }') AS p
    FROM resources
)
SELECT
    id AS patient_id,
    list_filter(p.identifier, i -> i.type.coding[1].code = 'MR')[1].value AS mrn,
    list_filter(p.identifier, i -> i.type.coding[1].code = 'MR')[1].system AS mrn_system,
    coalesce(list_filter(p.name, n -> n.use = 'official')[1], p.name[1]).family AS family_name,
    array_to_string(coalesce(list_filter(p.name, n -> n.use = 'official')[1], p.name[1]).given, ' ')
        AS given_name,
    p.gender,
    TRY_CAST(p.birthDate AS DATE) AS birth_date,
    coalesce(p.deceasedBoolean, p.deceasedDateTime IS NOT NULL) AS deceased,
    fhir_time(p.deceasedDateTime) AS deceased_at,
    list_filter(p.extension, e -> e.url LIKE '%us-core-race')[1]
        .extension[1].valueCoding.display AS race,
    list_filter(p.extension, e -> e.url LIKE '%us-core-ethnicity')[1]
        .extension[1].valueCoding.display AS ethnicity,
    p.maritalStatus.coding[1].code AS marital_status,
    p.address[1].city AS city,
    p.address[1].state AS state,
    p.address[1].postalCode AS postal_code,
    p.address[1].country AS country,
    p.active
FROM r
