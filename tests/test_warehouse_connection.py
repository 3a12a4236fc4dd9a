"""The warehouse named by the connection `health_ingest_warehouse`: the URL the project builds from it names what
the URI it was given names, as libpq reads both, whether Airflow reads the connection (in its tasks) or the project
does (its commands, outside Airflow); and the hosting check judges the hosts libpq will connect to."""

from __future__ import annotations

import json

import pytest
from psycopg2.extensions import parse_dsn

CONN = "AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE"

URIS = [
    "postgresql://postgres@127.0.0.1:5432/warehouse",
    "postgresql://postgres:@/warehouse?host=/run/health-ingest/pg-socket",  # a socket folder, as `make test` gives
    "postgresql://loader@:5433/warehouse?host=/var/run/postgresql",
    "postgresql://loader@%2Fvar%2Frun%2Fpostgresql/warehouse",
    "postgresql://loader@/warehouse?host=@abstract-socket",
    "postgresql://loader@db1.example.org:5432,db2.example.org:5433/warehouse?target_session_attrs=read-write",
    "postgresql://loader@db1.example.org,db2.example.org/warehouse?load_balance_hosts=random",
    "postgresql://loader@placeholder/warehouse?host=db1.example.org,db2.example.org&port=5432,5433",
    "postgresql://loader@[::1]:5432/warehouse",
    "postgresql://loader@warehouse.internal/warehouse?hostaddr=10.0.0.7&port=6432&sslmode=verify-full"
    "&sslrootcert=/etc/health-ingest/tls/ca.crt&connect_timeout=5",
    "postgresql://loader:p%40ss%2Fword@db.example.org/ware%20house?options=-c%20search_path%3Dfhir%2Cpublic"
    "&application_name=loads",
    "postgresql:///warehouse?service=warehouse&sslmode=require",
]


@pytest.fixture(params=["read by Airflow", "read by the project"])
def reader(request, monkeypatch):
    """The connection as Airflow's tasks read it (Airflow's own lookup), or as the commands do outside Airflow."""
    import airflow.sdk  # noqa: F401  (a process where Airflow is loaded asks Airflow)
    from health_ingest import config
    from health_ingest.airflow.connections import read_connection

    monkeypatch.delenv(config.ENV_WAREHOUSE_URL, raising=False)
    monkeypatch.setattr(config, "_airflow_reader", read_connection if request.param == "read by Airflow" else None)
    return request.param


@pytest.mark.parametrize("uri", URIS)
def test_a_libpq_uri_given_as_the_connection_names_the_same_warehouse(uri, reader, monkeypatch, tmp_path):
    from health_ingest.warehouse.connection import configured_warehouse_url
    from health_ingest.warehouse.jurisdiction import libpq_endpoint

    services = tmp_path / "pg_service.conf"
    services.write_text("[warehouse]\nhost=db.example.org\nport=5433\n")
    monkeypatch.setenv(CONN, uri)
    url = configured_warehouse_url()

    assert parse_dsn(url) == parse_dsn(uri), url
    environ = {"PGSERVICEFILE": str(services)}
    assert libpq_endpoint(url, environ) == libpq_endpoint(uri, environ)


def test_the_usual_uris_come_back_as_they_were_given(reader, monkeypatch):
    from health_ingest.warehouse.connection import configured_warehouse_url

    for uri in [URIS[0], URIS[1], URIS[2], URIS[5], URIS[8], URIS[9]]:
        monkeypatch.setenv(CONN, uri)
        assert configured_warehouse_url() == uri


def test_a_connection_in_json_form_keeps_its_socket_folder_and_libpq_extras(reader, monkeypatch):
    from health_ingest.warehouse.connection import configured_warehouse_url

    hosting = {"provider": "on-premises", "region": "fr-idf", "jurisdiction": "FR"}
    connection = {
        "conn_type": "postgres",
        "host": "/var/run/postgresql",
        "port": 5433,
        "schema": "warehouse",
        "login": "loader",
        "extra": {"options": "-c statement_timeout=0", "keepalives": True, "hosting": hosting, "cursor": "dict"},
    }
    monkeypatch.setenv(CONN, json.dumps(connection))

    assert parse_dsn(configured_warehouse_url()) == {
        "user": "loader",
        "host": "/var/run/postgresql",
        "port": "5433",
        "dbname": "warehouse",
        "options": "-c statement_timeout=0",
        "keepalives": "1",
    }, "the hosting declaration and Airflow's own extras are not libpq's"


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("postgresql://loader@localhost/warehouse?hostaddr=203.0.113.7", "203.0.113.7"),
        ("postgresql://loader@127.0.0.1/warehouse?host=db.example.org", "db.example.org"),
        ("postgresql://loader@127.0.0.1:5432,db.example.org:5433/warehouse", "db.example.org"),
        ("postgresql://loader@/warehouse?host=/var/run/postgresql,db.example.org", "db.example.org"),
    ],
)
def test_the_hosting_check_judges_the_hosts_libpq_connects_to_from_the_connection(uri, remote, reader, monkeypatch):
    from health_ingest.errors import JurisdictionRefused
    from health_ingest.warehouse.connection import configured_warehouse_url, connect

    for variable in ("PGHOST", "PGHOSTADDR", "PGSERVICE", "PGSSLMODE", "HEALTH_INGEST_WAREHOUSE_HOSTING"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(CONN, uri)

    with pytest.raises(JurisdictionRefused, match=rf"rule 'declaration-required'.*{remote}"):
        connect(configured_warehouse_url())


def test_a_password_given_in_the_query_is_redacted_too():
    from health_ingest.warehouse.connection import redact

    shown = redact("postgresql://loader:s3cret@db.example.org/warehouse?password=0ther&sslmode=verify-full")
    assert "s3cret" not in shown and "0ther" not in shown and "sslmode=verify-full" in shown


def test_a_tables_asset_names_the_warehouse_libpq_connects_to():
    from health_ingest.warehouse.consumers import table_asset_uri

    assert table_asset_uri("flat", "encounter", URIS[1]) == "postgres://localhost:5432/warehouse/flat/encounter"
    assert table_asset_uri("fhir", "patient", URIS[5]) == "postgres://db1.example.org:5432/warehouse/fhir/patient"
    assert table_asset_uri("fhir", "patient", URIS[7]) == "postgres://db1.example.org:5432/warehouse/fhir/patient"
    assert table_asset_uri("fhir", "patient", URIS[8]) == "postgres://[::1]:5432/warehouse/fhir/patient"
