-- Privacy: the escrow (apart from the research tables, own role), person links, privacy checks, re-keying.

CREATE SCHEMA IF NOT EXISTS escrow;

-- Originals under AES-SIV, one row per token; only the escrow role (and the loader that owns it) reads it.
CREATE TABLE escrow.identifiers (
    token        text PRIMARY KEY,
    domain       text NOT NULL,
    ciphertext   bytea NOT NULL,
    key_id       text NOT NULL,
    batch_id     uuid NOT NULL,
    escrowed_at  timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'health_ingest_escrow') THEN
        CREATE ROLE health_ingest_escrow NOLOGIN;
    END IF;
END
$$;
REVOKE ALL ON SCHEMA escrow FROM PUBLIC;
GRANT USAGE ON SCHEMA escrow TO health_ingest_escrow;
GRANT SELECT ON escrow.identifiers TO health_ingest_escrow;

-- A Patient's resource token -> the person pseudonym of its linking identifier (an SSN, a NIR...), so that
-- every resource of that patient carries the pseudonym that other sources sharing the identifier use.
CREATE TABLE ingest.person_links (
    id_space       text NOT NULL,
    patient_token  text NOT NULL,
    person_id      text NOT NULL,
    batch_id       uuid NOT NULL,
    PRIMARY KEY (id_space, patient_token)
);

CREATE TABLE ingest.privacy_checks (
    check_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id          uuid NOT NULL REFERENCES ingest.batches ON DELETE CASCADE,
    check_name        text NOT NULL,
    quasi_identifiers text[] NOT NULL,
    k                 integer NOT NULL,
    classes           bigint NOT NULL,
    classes_below_k   bigint NOT NULL,
    records_below_k   bigint NOT NULL,
    action            text NOT NULL CHECK (action IN ('warn', 'reject')),
    passed            boolean NOT NULL,
    checked_at        timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE ingest.batches
    ADD COLUMN rekeyed_from text,
    ADD COLUMN rekeyed_at timestamptz;
