"""Data quality: per-record structural checks on the hot path, reconciliation and suites after staging."""
