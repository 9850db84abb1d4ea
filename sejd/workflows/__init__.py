"""What users run: check, tune, bench, analyze, train, the demo, and the Session that opens a model."""
