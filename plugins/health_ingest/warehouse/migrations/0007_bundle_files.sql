-- A delivered FHIR Bundle is recorded as 'unpacked': its entries are loaded from the files derived from it.
ALTER TABLE ingest.batch_files DROP CONSTRAINT batch_files_status_check;
ALTER TABLE ingest.batch_files ADD CONSTRAINT batch_files_status_check
    CHECK (status IN ('loaded', 'skipped', 'unpacked'));
ALTER TABLE ingest.batch_files ADD COLUMN derived_from text;
