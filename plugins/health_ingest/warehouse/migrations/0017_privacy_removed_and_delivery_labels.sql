-- What the pseudonymiser removed from a batch because it did not understand it, by reason and FHIR element
-- (`{"free text": {"Observation.valueString": 12}, "unexpected shape": {...}, "identifying value": {...}}`): element
-- names only, never a value, so readers may see it beside the batch's counts.
ALTER TABLE ingest.batches ADD COLUMN IF NOT EXISTS privacy_removed jsonb NOT NULL DEFAULT '{}'::jsonb;
GRANT SELECT (privacy_removed) ON ingest.batches TO health_ingest_reader;

-- A delivery's folder is named by its sender, sometimes after a patient: batches now record a keyed label of the
-- name instead. The names recorded before cannot be labelled here (the key is not in the warehouse): they go.
UPDATE ingest.batches SET delivery = NULL WHERE delivery IS NOT NULL;
