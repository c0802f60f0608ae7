"""Custom operators: native CPU kernels for decode steps (built on first use, see ``native``)."""
