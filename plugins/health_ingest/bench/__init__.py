"""The benchmark: the real batch path on scaled real records, next to this machine's floor."""
