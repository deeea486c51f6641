"""Reports: the JSON schema of a profile report, and its renderings."""
