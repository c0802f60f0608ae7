"""Graph rewrites, one per file; the manager runs them in order."""
