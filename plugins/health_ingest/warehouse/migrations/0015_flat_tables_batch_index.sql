-- A flat table's quality suite reads the rows of the batch being refreshed (`WHERE batch_id = ...`): without an
-- index on batch_id, every refresh read the whole table, and grew with the warehouse. Flat tables are made on first
-- use; those made before this migration get the index here, later ones when they are made.
DO $migration$
DECLARE
    flat_table text;
BEGIN
    FOR flat_table IN
        SELECT c.table_name FROM information_schema.columns c
         WHERE c.table_schema = 'flat' AND c.column_name = 'batch_id'
    LOOP
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON flat.%I (batch_id)', flat_table || '_batch_id_idx', flat_table);
    END LOOP;
END
$migration$;
