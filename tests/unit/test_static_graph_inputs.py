"""Tensors that compiled blocks read as *static* graph inputs must keep their addresses across requests.

``torch.compile`` lifts the tensors a block reads from module attributes (not only parameters) as static inputs:
under CUDA graphs (``runtime.cuda_graphs``) the recorded graph reads them at the address it was recorded with, and
when one moves, CUDA graph trees record the block again. A value served per request from a new tensor (a step
table's row buffers, made in ``prepare``) therefore re-recorded every block on the first step of every request: on
an H200, Flux.1-dev 1024^2 with CUDA graphs, the first step of each job took ~770 ms against 118 ms for the others
(`benchmarks/single_gpu.py`'s service rows, 2026-11-28), and the trees kept every recording.

The probe below is a dynamo backend that runs the traced graph as is and notes, on every call, the addresses of the
inputs dynamo marked static. Two requests whose per-request tensors are alive at the same time (so no allocator can
hand the second the first's addresses) must present the same addresses at every call of every step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.runtime import RuntimeConfig, denoiser_module, repeated_blocks
from tests.flexcache_cases import make_job
from tests.workers import start_worker


class StaticInputProbe:
    """``torch.compile(fn, backend=probe)``: each call of a compiled graph appends the data pointers of its static
    inputs to ``calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.static_counts: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        static = [i for i, node in enumerate(placeholders)
                  if node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]
        self.static_counts.append(len(static))

        def run(*args):
            self.calls.append(tuple(args[i].data_ptr() for i in static if isinstance(args[i], torch.Tensor)))
            return gm.forward(*args)

        return run


@pytest.mark.parametrize("family", ["tiny_flux", "tiny_wan", "tiny_flux2_klein", "tiny_z_image", "tiny_qwen_image"])
def test_static_inputs_of_compiled_blocks_keep_their_addresses_across_requests(family: str,
                                                                              request: pytest.FixtureRequest) -> None:
    checkpoint: Path = request.getfixturevalue(family)
    worker = start_worker(checkpoint, RuntimeConfig())  # eager start; the probe compiles the blocks below
    probe = StaticInputProbe()
    blocks = repeated_blocks(denoiser_module(worker.runner.model))
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=probe, fullgraph=False)
    try:
        jobs = [make_job(checkpoint, None, request_id=f"r{i}", steps=2, seed=11 + i) for i in range(2)]
        for job in jobs:  # both prepared before either runs: the second's per-request tensors get new addresses
            worker.add_request(job)
        per_step: list[list[tuple[int, ...]]] = []
        for job in jobs:
            for step in range(job.start_step, job.end_step):
                first = len(probe.calls)
                worker.execute_step(job.request_id, step).wait()
                per_step.append(probe.calls[first:])
            worker.finish_request(job.request_id)
    finally:
        for block in blocks:
            del block.forward
        torch._dynamo.reset()
    assert sum(probe.static_counts) > 0  # the parameters at least: the probe sees what dynamo marks static
    assert len(per_step[0]) >= len(blocks)
    steps = len(per_step) // len(jobs)
    for i, calls in enumerate(per_step[1:], start=1):
        # a step calls the blocks the first step called; Z-Image's context refiner runs on a request's first step
        # only, so its later steps are compared with the same step of the first request
        if len(calls) == len(per_step[0]):
            same = per_step[0]
        elif i >= steps:
            same = per_step[i - steps]
        else:
            continue  # the first request's own later steps: the second request's are compared with them
        moved = [j for j, (a, b) in enumerate(zip(same, calls, strict=True)) if a != b]
        assert not moved, (f"step {i} (request r{i // steps}): the static inputs of compiled block calls {moved} are "
                           f"at other addresses than in the first request; under CUDA graphs each would be recorded "
                           f"again")
