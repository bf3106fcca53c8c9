"""The application layer: command line, pipeline, ablations, export bundles, reporting."""
