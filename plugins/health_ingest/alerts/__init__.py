"""Alerts for operators: their content, the events that send them, and the record that sends each once."""
