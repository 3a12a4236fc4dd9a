"""A batch: the lifecycle every format shares, one loader per format, the shared workers, and `load_delivery`."""
