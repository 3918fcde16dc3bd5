"""CMD engine: models, configs, pipeline, backends and the command-line tools."""
