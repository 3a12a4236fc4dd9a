"""Pseudonymisation: keys, identifier tokens and the rewriting of resources."""
