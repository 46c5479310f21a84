"""A run's workdir on disk: its Orbax checkpoints with their checksums and lineage
(checkpoint), and its config.json, the config inheritance of tune configs and `prepare`,
the one way from a config file to the config a run starts with (run_config)."""
