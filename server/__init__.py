"""How BitSkip is served: CLI, HTTP app, schemas and metrics."""
