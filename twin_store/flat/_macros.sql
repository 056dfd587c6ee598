-- Helpers the flat-table queries share. Temp macros: defined on every store connection.
CREATE OR REPLACE TEMP MACRO ref_id(ref, type) AS
    nullif(regexp_extract(ref, '(?:^|/)' || type || '/([A-Za-z0-9\-\.]{1,64})(?:/_history/.*)?$', 1), '');
CREATE OR REPLACE TEMP MACRO fhir_time(t) AS TRY_CAST(t AS TIMESTAMPTZ);
CREATE OR REPLACE TEMP MACRO pick_coding(codings, sys) AS
    coalesce(list_filter(codings, c -> c.system = sys)[1], codings[1]);
