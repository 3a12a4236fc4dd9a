"""Regenerates `definitions.json` from the FHIR R4 core StructureDefinitions (`profiles-types.json` and
`profiles-resources.json` of the R4 definitions download, 4.0.1, CC0):

    python -m health_ingest.quality.r4.build DEFINITIONS_FOLDER [--origin TEXT]

It keeps what strict validation needs and nothing else: the constraints (key, severity, human text, FHIRPath
expression, the definition that states it), the elements they sit on, and each element's children with their types,
so that a datatype's constraints (per-1 on a Period) are checked wherever that datatype appears.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
OUTPUT = HERE / "definitions.json"
FHIR_VERSION = "4.0.1"
# Types whose elements are not walked: their value is a JSON primitive (or the XHTML string of a narrative)
PRIMITIVE_ROOTS = {"Element", "BackboneElement", "Resource", "DomainResource"}


def build(folder: Path, origin: str) -> dict[str, Any]:
    definitions = []
    for name in ("profiles-types.json", "profiles-resources.json"):
        bundle = json.loads((folder / name).read_text(encoding="utf-8"))
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if (
                resource.get("resourceType") == "StructureDefinition"
                and resource.get("fhirVersion") == FHIR_VERSION
                and resource.get("derivation") != "constraint"
                and resource.get("kind") in ("complex-type", "resource", "primitive-type")
            ):
                definitions.append(resource)
    primitives = {d["type"] for d in definitions if d["kind"] == "primitive-type"}
    primitives |= {"xhtml"}
    constraints: dict[str, dict[str, str]] = {}
    elements: dict[str, dict[str, Any]] = {}
    extension_values: dict[str, list[str]] = {}
    for definition in definitions:
        if definition["kind"] == "primitive-type":
            continue
        for element in definition["snapshot"]["element"]:
            path = element["path"]
            keys = []
            for constraint in element.get("constraint", ()):
                key = constraint["key"]
                found = {
                    "key": key,
                    "severity": constraint["severity"],
                    "human": constraint["human"],
                    "expression": constraint.get("expression", ""),
                    "source": constraint.get("source", definition["url"]),
                }
                # a key names one rule, but a few keys are reused by unrelated definitions (inv-1)
                ident, n = key, 1
                while ident in constraints and constraints[ident] != found:
                    n += 1
                    ident = f"{key}#{n}"
                constraints[ident] = found
                keys.append(ident)
            if "." not in path:
                elements.setdefault(path, {"constraints": [], "children": {}})["constraints"] = keys
                continue
            parent, name = path.rsplit(".", 1)
            node = elements.setdefault(path, {"constraints": [], "children": {}})
            node["constraints"] = keys
            node["max"] = element.get("max", "*")
            children = elements.setdefault(parent, {"constraints": [], "children": {}})["children"]
            if "contentReference" in element:
                children[name] = [element["contentReference"].lstrip("#"), name, "BackboneElement"]
                continue
            types = [t["code"] for t in element.get("type", ())]
            if not types:
                continue
            for code in types:
                json_name = name
                if name.endswith("[x]"):
                    json_name = name[:-3] + code[0].upper() + code[1:]
                if code in ("BackboneElement", "Element") and not name.endswith("[x]"):
                    target = path  # its own children are defined here
                elif code in ("Resource",):
                    target = "#resource"  # typed by its own resourceType
                elif code in primitives or code.startswith("http://hl7.org/fhirpath/"):
                    target = None
                else:
                    target = code
                children[json_name] = [target, name, code]  # where its definition is, its element, its type
    extensions = folder / "extension-definitions.json"
    if extensions.exists():
        for entry in json.loads(extensions.read_text(encoding="utf-8"))["entry"]:
            definition = entry["resource"]
            if definition.get("fhirVersion") != FHIR_VERSION:
                continue
            for element in definition.get("snapshot", {}).get("element", ()):
                if element["path"] == "Extension.value[x]" and element.get("max") != "0":
                    extension_values[definition["url"]] = sorted(t["code"] for t in element.get("type", ()))
    return {
        "source": {
            "what": "FHIR R4 core StructureDefinitions (profiles-types.json, profiles-resources.json) and the core"
            " extension definitions (extension-definitions.json)",
            "fhirVersion": FHIR_VERSION,
            "origin": origin,
            "licence": "CC0-1.0 (HL7 FHIR specification)",
            "regenerate": "python -m health_ingest.quality.r4.build DEFINITIONS_FOLDER --origin TEXT",
        },
        "constraints": dict(sorted(constraints.items())),
        "elements": dict(sorted(elements.items())),
        "extension_value_types": dict(sorted(extension_values.items())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder holding profiles-types.json and profiles-resources.json")
    parser.add_argument("--origin", default="FHIR R4 definitions", help="where the folder came from")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    data = build(args.folder, args.origin)
    args.out.write_text(json.dumps(data, indent=0, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{len(data['constraints'])} constraints on {len(data['elements'])} elements written to {args.out}")


if __name__ == "__main__":
    main()
