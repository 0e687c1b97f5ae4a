"""The denoiser group's parallelism: process groups, CFG parallel, sequence-parallel attention and sharding,
rank launch and liveness, and the control channel between rank 0 and the workers.

- ``groups``: one rank layout ``arange(world).reshape(cfg, ring, ulysses)`` -> the cfg / ring / ulysses / sp
  groups (``ParallelGroups``, passed around, never global);
- ``cfg``: which CFG branch a rank computes and the once-per-step all-gather that combines them;
- ``attention``: Ulysses, Ring and USP as a wrapper around any attention kernel (``AttentionOps.joint``);
- ``sharding``: applies a family's ``SequenceParallelPlan`` (split inputs, pad, gather outputs) with module hooks;
- ``launch``: rendezvous (self-launched or torchrun), worker processes, heartbeats;
- ``control``: the small messages rank 0 broadcasts (add request, step, finish, abort, shutdown) and the worker loop.
"""
