"""The Sacred experiment, observers from the environment, resumable records, plots and tables."""
