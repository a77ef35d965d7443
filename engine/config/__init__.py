"""Configuration: the run spec (`spec`, its generated reference `spec_doc`), run presets (`presets`) and the
model and dataset catalogs (`catalog`) read from the presets/ folder. Everything else reads a run's
settings through these; none of them loads a model or touches a GPU."""
