"""SQL-on-FHIR v2: ViewDefinitions that flatten the warehouse's FHIR resources into analytic tables."""
