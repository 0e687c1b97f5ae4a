"""Our attention processors, one module per family: the projections, norms and rotary embeddings of the
family's diffusers processor, with the attention itself routed through ``AttentionOps`` (backend choice and
sequence parallelism). Each is tested equal to the diffusers processor it replaces."""
