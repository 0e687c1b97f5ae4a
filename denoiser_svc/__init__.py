"""Denoiser stage: a group of processes (rank 0 speaks gRPC) running the denoising loop.

Layers: server (proto <-> domain) -> engine (queue, step-level scheduling, cancellation) -> executor (fan-out to
ranks) -> worker (one per device: model, resident request states) -> runner (one step of one request).
"""
