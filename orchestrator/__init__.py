"""Orchestrator: the public GenerationService; routes each model's requests through its stage services."""
