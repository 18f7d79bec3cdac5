"""Point-to-point messages between neighbouring ranks of a distributed parallel run.

What this file holds: the message header (`encode_header` / `decode_header`), a `Link` to
one neighbour and the bounded send/receive threads (`Outbox`, `Inbox`), the activation
streams built on them (`OutputTap`, `forward_stream`, `received`, `StreamSource`) and two
JSON collectives. `edgetrain.regimes.distributed` places modules on ranks and runs them; the
protocol and why every batch is consumed once, in order, is described there.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import queue
import threading
from typing import Iterator

import torch
import torch.distributed as dist

from edgetrain.errors import UserError, first_line
from edgetrain.method.stage import Stage

END = -1  # phase of the end-of-stream message
PHASE_VAL, PHASE_TEST = 1_000_000, 1_000_001  # training phases are the epoch numbers
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIMS = 6
HEADER_LEN = 4 + MAX_DIMS  # phase, index, dtype code, ndim, dims...


# ----------------------------------------------------------------------------- messages

class PeerLost(UserError):
    """Another rank stopped, or did not answer within the timeout."""


def other_ranks() -> str:
    """'rank 1' or 'one of ranks 1, 2, 3': who a collective on this rank waits for."""
    me, n = dist.get_rank(), dist.get_world_size()
    others = [str(r) for r in range(n) if r != me]
    return f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(others)}"


def comm(what: str, fn, *args, peer: int | None = None, **kw):
    """Run one torch.distributed call; its failure (gloo and NCCL raise RuntimeError
    subclasses) becomes `PeerLost` naming the rank lost (`peer`, or for a collective every
    other rank), while errors elsewhere keep their traceback."""
    try:
        return fn(*args, **kw)
    except RuntimeError as e:
        who = f"rank {peer}" if peer is not None else other_ranks()
        raise PeerLost(f"lost contact with {who} during {what} ({first_line(e)})") from None


def encode_header(phase: int, index: int, z: torch.Tensor | None) -> torch.Tensor:
    """(HEADER_LEN,) int64: phase, batch index, dtype code, ndim, shape padded with zeros."""
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[1] = phase, index
    if z is not None:
        if z.dim() > MAX_DIMS or z.dtype not in DTYPES:
            raise ValueError(f"cannot send a {z.dim()}-d {z.dtype} tensor")
        h[2], h[3] = DTYPES.index(z.dtype), z.dim()
        h[4:4 + z.dim()] = torch.tensor(z.shape)
    return h


def decode_header(h: torch.Tensor) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
    v = h.tolist()
    return v[0], v[1], DTYPES[v[2]], tuple(v[4:4 + v[3]])


class Link:
    """Point-to-point messages (header, activations, labels) with one neighbour rank."""

    def __init__(self, peer: int, group, device: torch.device):
        self.peer, self.group, self.device = peer, group, device

    def _p2p(self, what: str, fn, t: torch.Tensor) -> None:
        comm(what, fn, t, self.peer, group=self.group, peer=self.peer)

    def send(self, phase: int, index: int, z: torch.Tensor | None, y: torch.Tensor | None) -> None:
        self._p2p("a send", dist.send, encode_header(phase, index, z).to(self.device))
        if z is not None:
            self._p2p("a send", dist.send, z.contiguous().to(self.device))
            self._p2p("a send", dist.send, y.to(self.device, torch.int64).contiguous())

    def recv(self) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._p2p("a receive", dist.recv, h)
        phase, index, dtype, shape = decode_header(h)
        if phase == END:
            return phase, index, None, None
        z = torch.empty(shape, dtype=dtype, device=self.device)  # (B, C, H, W)
        self._p2p("a receive", dist.recv, z)
        y = torch.empty(shape[0], dtype=torch.int64, device=self.device)
        self._p2p("a receive", dist.recv, y)
        return phase, index, z, y


class Outbox:
    """Sends messages to the next rank: synchronously (capacity 0) or from a background
    thread that holds at most `capacity` messages, so that sending overlaps compute."""

    def __init__(self, link, capacity: int, poll_s: float = 0.2):
        self.link, self.poll_s, self.error = link, poll_s, None
        self.q = queue.Queue(maxsize=capacity) if capacity > 0 else None
        self.thread = None
        if self.q is not None:
            self.thread = threading.Thread(target=self._run, name="edgetrain-send", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                msg = self.q.get()
                self.link.send(*msg)
                if msg[0] == END:
                    return
        except BaseException as e:  # handed to the training thread by put/close
            self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, phase: int, index: int, z: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """Queue one message (blocks while `capacity` messages wait); re-raises a send error."""
        if self.q is None:
            self.link.send(phase, index, z, y)
            return
        while True:
            self._raise()
            try:
                self.q.put((phase, index, z, y), timeout=self.poll_s)
                return
            except queue.Full:
                continue

    def close(self, timeout_s: float) -> None:
        """Send the end-of-stream message and wait until everything has left."""
        self.put(END, 0, None, None)
        if self.thread is not None:
            self.thread.join(timeout_s)
            self._raise()
            if self.thread.is_alive():
                raise PeerLost(f"the next rank took no data for {timeout_s:.0f} s")


class Inbox:
    """Receives messages from the previous rank: synchronously (capacity 0) or through a
    background thread that receives ahead, at most `capacity` messages."""

    def __init__(self, link, capacity: int, poll_s: float = 0.2):
        self.link, self.poll_s = link, poll_s
        self.q = queue.Queue(maxsize=capacity) if capacity > 0 else None
        self.thread = None
        if self.q is not None:
            self.thread = threading.Thread(target=self._run, name="edgetrain-recv", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                msg = self.link.recv()
                self.q.put(msg)
                if msg[0] == END:
                    return
        except BaseException as e:
            self.q.put(e)

    def _next(self):
        if self.q is None:
            return self.link.recv()
        msg = self.q.get()
        if isinstance(msg, BaseException):
            raise msg
        return msg

    def get(self, phase: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (activations, labels); checks it is batch `index` of `phase`."""
        got_phase, got_index, z, y = self._next()
        if (got_phase, got_index) != (phase, index):
            raise RuntimeError(f"protocol error: expected batch {index} of phase {phase}, "
                               f"got batch {got_index} of phase {got_phase}")
        return z, y

    def close(self) -> None:
        """Consume the end-of-stream message."""
        got_phase, _, _, _ = self._next()
        if got_phase != END:
            raise RuntimeError(f"protocol error: expected the end of stream, got phase {got_phase}")
        if self.thread is not None:
            self.thread.join()


# ----------------------------------------------------------------------------- streams

class OutputTap:
    """Forward hook on a stage's last block that keeps its last detached output, the stage's
    features (the tensor the single-process parallel regime passes to the next module).
    On the block, not the stage: training calls `Stage.forward_transport` or
    `forward_statistic`, which bypass the stage's own forward hooks."""

    def __init__(self, stage: Stage):
        self.z = None
        self.handle = stage.blocks[-1].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.z = output[0].detach()  # output = (out, residue)

    def remove(self) -> None:
        self.handle.remove()


def forward_stream(batches: Iterator, tap: OutputTap | None, outbox: Outbox | None,
                   phase: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `batches`; once the consumer has processed one, send the tap's features on."""
    for i, (x, y) in enumerate(batches):
        if tap is not None:
            tap.z = None
        yield x, y
        if outbox is not None:
            if tap.z is None:
                raise RuntimeError("the last stage produced no features for this batch")
            outbox.put(phase, i, tap.z, y)


def received(inbox: Inbox, phase: int, n_batches: int,
             fmt: torch.memory_format = torch.preserve_format
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of `phase` from the previous rank; (B, C, H, W) activations in memory
    format `fmt` (they travel contiguous; the modules may be channels-last, #29)."""
    for i in range(n_batches):
        z, y = inbox.get(phase, i)
        yield (z.contiguous(memory_format=fmt) if z.dim() == 4 else z), y


@dataclass
class StreamSource:
    """A `BatchSource` that reads the previous rank's activations, passing its own on."""

    inner: object  # a BatchSource (rank 0) or None (batches come from `inbox`)
    inbox: Inbox | None
    steps: int
    tap: OutputTap | None
    outbox: Outbox | None
    memory_format: torch.memory_format = torch.preserve_format  # of received activations

    def steps_per_epoch(self) -> int:
        return self.steps

    def epoch(self, epoch: int = 0, salt: int = 0):
        src = (self.inner.epoch(epoch, salt) if self.inbox is None
               else received(self.inbox, epoch, self.steps, self.memory_format))
        return forward_stream(src, self.tap, self.outbox, epoch)


# ----------------------------------------------------------------------------- collectives

def _tensor_from_json(obj, device) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)


def all_gather_json(obj, device: torch.device) -> list:
    """Every rank's JSON-serialisable `obj`, in rank order (JSON over uint8, no pickle)."""
    data = _tensor_from_json(obj, device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    comm("all_gather", dist.all_gather, sizes,
         torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: len(data)] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in sizes]
    comm("all_gather", dist.all_gather, parts, padded)
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes)]


def broadcast_json(obj, device: torch.device) -> object:
    """Rank 0's `obj` on every rank."""
    return all_gather_json(obj, device)[0]
