"""The control channel of a denoiser group: rank 0 broadcasts small messages, the workers follow them.

Latents and per-request state stay resident on every rank; what travels per step is one ``Step`` message (request
id and step index, a few dozen bytes over the gloo control group). A request's inputs travel once, in
``AddRequest``. Every rank handles the messages in the same order, so the collectives inside the steps line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from denoiser_svc.types import DenoiseJob
from services.log import bind_request, get_logger

if TYPE_CHECKING:
    from denoiser_svc.worker import Worker

log = get_logger(__name__)


@dataclass(frozen=True)
class AddRequest:
    """Make a request resident (rank 0 validated and prepared it first)."""

    job: DenoiseJob


@dataclass(frozen=True)
class Step:
    """Run one step of a resident request."""

    request_id: str
    step: int


@dataclass(frozen=True)
class Drop:
    """Forget a request (finished: rank 0 returns its latents; or aborted)."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Leave the worker loop and exit 0."""


Message = AddRequest | Step | Drop | Shutdown


class ControlChannel:
    """Broadcast from rank 0 over the gloo control group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def send(self, message: Message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def barrier(self) -> None:
        """Every rank has started (loaded, warmed up) and entered its loop."""
        dist.barrier(group=self.group)

    def recv(self) -> Message:
        box: list[Message | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        assert box[0] is not None
        return box[0]


def follow(worker: Worker, channel: ControlChannel) -> None:
    """The loop of ranks 1..N-1: apply rank 0's messages until ``Shutdown``. Any error propagates (the process
    exits non-zero: its peers' collectives would no longer line up)."""
    while True:
        msg = channel.recv()
        if isinstance(msg, Step):
            worker.execute_step(msg.request_id, msg.step)
        elif isinstance(msg, AddRequest):
            with bind_request(msg.job.request_id):
                worker.add_request(msg.job)
        elif isinstance(msg, Drop):
            worker.abort_request(msg.request_id)
        elif isinstance(msg, Shutdown):
            log.info("worker_shutdown", rank=worker.rank)
            return
        else:
            raise TypeError(f"unknown control message {msg!r}")
