"""Every DAG imports and serialises without a database: one broken DAG would break every `dag.test()`."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"


def _dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


STATIC_DAGS = ["delivery_messages", "example_consumer", "maintenance_retention", "maintenance_source_cadence"]


def _declared_dag_ids() -> list[str]:
    """One DAG per FHIR source of the sources file, plus the DAGs written by hand."""
    from health_ingest.sources.registry import load_sources

    generated = [source.dag_id for source in load_sources().values()]
    return sorted(generated + STATIC_DAGS)


def test_dag_folder_imports_without_errors():
    bag = _dag_bag()
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == _declared_dag_ids()


@pytest.mark.parametrize("dag_id", _declared_dag_ids())
def test_dag_serialises_and_is_documented(dag_id):
    from airflow.serialization.serialized_objects import DagSerialization

    dag = _dag_bag().dags[dag_id]
    serialised = DagSerialization.to_dict(dag)
    DagSerialization.validate_schema(serialised)
    restored = DagSerialization.from_dict(serialised)
    assert restored.dag_id == dag_id
    assert dag.doc_md and dag.tags and dag.description
    assert dag.dag_id in _declared_dag_ids()
    assert dag.catchup is False
    for task in dag.tasks:
        assert task.owner != "airflow", "owner comes from the sources file"
        assert task.retries >= 1
