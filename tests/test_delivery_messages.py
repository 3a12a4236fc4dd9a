"""Deliveries named from outside (a queue message, `delivery_path`) are loaded only from a source's allowed roots."""

from __future__ import annotations

import json
import logging

import pytest
from health_ingest.errors import ConfigurationError
from health_ingest.sources.inbox import delivery_label
from health_ingest.sources.messages import RefusedMessage, route_message, route_messages
from health_ingest.sources.registry import load_sources


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "sources.yml").write_text(
        json.dumps(
            {
                "sources": [
                    {"name": "clinic_a", "kind": "fhir", "inbox": str(tmp_path / "inbox" / "clinic_a")},
                    {
                        "name": "clinic_b",
                        "kind": "fhir",
                        "inbox": str(tmp_path / "inbox" / "clinic_b"),
                        "allowed_roots": [str(tmp_path / "dropbox")],
                    },
                ]
            }
        )
    )
    for folder in ("inbox/clinic_a/export-1", "inbox/clinic_b/export-1", "dropbox/export-2", "elsewhere/Durand"):
        (tmp_path / folder).mkdir(parents=True)
    return load_sources(tmp_path / "sources.yml")


def test_a_message_naming_a_folder_in_the_sources_roots_is_routed_to_its_dag(sources, tmp_path):
    route = route_message(json.dumps({"source": "clinic_b", "delivery": str(tmp_path / "dropbox/export-2")}), sources)
    assert route.trigger_kwargs() == {
        "trigger_dag_id": "fhir_clinic_b",
        "conf": {"delivery_path": str(tmp_path / "dropbox/export-2")},
    }
    assert sources["clinic_a"].allowed_roots == (tmp_path / "inbox" / "clinic_a",), "the inbox by default"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"source": "clinic_a", "delivery": "{root}/elsewhere/Durand"}, "outside the source's allowed roots"),
        ({"source": "clinic_a", "delivery": "{root}/inbox/clinic_a/../../elsewhere/Durand"}, "outside"),
        ({"source": "clinic_a", "delivery": "{root}/inbox/clinic_a/link-out"}, "outside"),
        ({"source": "clinic_b", "delivery": "{root}/inbox/clinic_b/export-1"}, "outside"),  # roots replace the inbox
        ({"source": "clinic_a", "delivery": "{root}/inbox/clinic_a"}, "outside"),  # a root is not a delivery
        ({"source": "clinic_a", "delivery": "{root}/inbox/clinic_a/absent"}, "not a folder"),
        ({"source": "clinic_z", "delivery": "{root}/inbox/clinic_a/export-1"}, "not declared: 'clinic_z'"),
        ({"source": "Jane Doe", "delivery": "{root}/inbox/clinic_a/export-1"}, "not declared: an invalid name"),
        ({"delivery": "{root}/inbox/clinic_a/export-1"}, "not declared"),
        ({"source": "clinic_a"}, "not a delivery message"),
    ],
)
def test_a_message_outside_the_rules_is_refused_without_quoting_its_folder(sources, tmp_path, message, reason):
    (tmp_path / "inbox/clinic_a/link-out").symlink_to(tmp_path / "elsewhere/Durand")
    data = json.dumps({k: v.replace("{root}", str(tmp_path)) for k, v in message.items()})
    with pytest.raises(RefusedMessage, match=reason) as refused:
        route_message(data, sources)
    assert "Durand" not in str(refused.value) and str(tmp_path) not in str(refused.value)


def test_refused_messages_are_logged_and_the_others_routed_in_order(sources, tmp_path, caplog):
    good = json.dumps({"source": "clinic_a", "delivery": str(tmp_path / "inbox/clinic_a/export-1")})
    outside = json.dumps({"source": "clinic_a", "delivery": str(tmp_path / "elsewhere/Durand")})
    with caplog.at_level(logging.INFO, logger="health_ingest.sources.messages"):
        routes = route_messages([outside, "not json", good], sources)
    assert [r.delivery.name for r in routes] == ["export-1"]
    assert "delivery message 1 of 3 refused, not loaded: source 'clinic_a': the delivery is outside" in caplog.text
    assert "delivery message 2 of 3 refused, not loaded: not JSON" in caplog.text
    assert "Durand" not in caplog.text


def test_allowed_roots_must_be_a_list_of_folders(tmp_path):
    entry = {"name": "a", "kind": "fhir", "allowed_roots": "/"}
    (tmp_path / "sources.yml").write_text(json.dumps({"sources": [entry]}))
    with pytest.raises(ConfigurationError, match="'allowed_roots' must be a list of folders"):
        load_sources(tmp_path / "sources.yml")


def test_a_delivery_is_shown_by_its_folder_name_only_when_that_is_an_exports_usual_name(tmp_path):
    for name in ("2026-12-01", "export-0042", "delivery_7", "20261201T101010Z"):
        assert delivery_label(tmp_path / name) == name
    person = tmp_path / "Durand_Marie_1968"
    person.mkdir()
    (person / "_READY").touch()
    label = delivery_label(person)
    assert label.startswith("delivery-20") and "Durand" not in label
