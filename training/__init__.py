"""Everything that needs torch: configuration, data, models, the Accelerate loop, artifacts, the CLI."""
