"""The differentiable render of a DNO update, replayed as CUDA graphs.

Every update of a run renders the same chain: x_T and the step noises
through every sampling step and the decoder to an image, then the backward
pass from the image's gradient to the noises' gradients. Shapes, sigmas,
conditioning and weights never change within a run; only the values of the
noise do, and the optimiser updates those in place. Run eagerly, the chain
is tens of thousands of small kernel launches from Python per update and
the GPU waits on the host. Captured once as two CUDA graphs (forward with the
activations it keeps, and backward), each update is two graph launches.

:class:`EagerRender` is the plain path and the reference. :class:`GraphedRender`
runs the first update eagerly (that run is also the warm-up the capture
needs: lazy initialisation, cuDNN / cuBLAS plans, a ControlNet's hint),
captures both graphs before the optimiser changes the noise, replays them on
that same noise and compares with the eager image and gradient. Only if both
agree does it use the graphs for the rest of the run. A capture that fails
(a host synchronisation or a host-to-device copy inside the model call, which
a graph cannot hold) or a replay that disagrees logs why and leaves the run
eager: never a wrong result. Values that a graph bakes in (the sigmas, the
conditioning, the weights' addresses) are constant for the run, and a value
read back to the host during the call cannot be captured at all, which is
what makes the check at capture time sufficient.

Both renders have the same interface: ``forward(graph)`` returns the
detached ``(latent, image)`` of the current noise; ``backward(grad_image)``
adds the noises' gradients to their ``.grad``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("DNO")

RenderFn = Callable[[], Tuple[torch.Tensor, torch.Tensor]]
# replay ‖graph − eager‖ / ‖eager‖ accepted at capture time. The forward replays the eager pass's
# kernels on its inputs (bitwise equal on the H200: 0.0 for SD1.5). Backward kernels sum with
# atomics in no fixed order, and through 50 bf16 steps two eager backwards of the same noise
# differ by about 1 % (measured on the H200, SD1.5 512²). A value wrongly baked into a graph is
# off by O(1).
IMAGE_TOLERANCE = 1e-2
GRAD_TOLERANCE = 5e-2
_STREAMS = {}


def capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for every run: cuBLAS keeps a workspace per stream for the
    life of the process, so a new stream per run would leave one behind each time."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device)
    return _STREAMS[index]


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (cheap; False without CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class EagerRender:
    """The render as ordinary autograd: a graph per update, freed by its backward."""

    def __init__(self, fn: RenderFn, reason: str = "eager"):
        self.fn = fn
        self._image: Optional[torch.Tensor] = None
        self.info = {"cuda_graphs": False, "reason": reason}

    def forward(self, graph: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(graph):
            out, image = self.fn()
        self._image = image if graph and image.requires_grad else None
        return out.detach(), image.detach()

    def backward(self, grad_image: torch.Tensor) -> None:
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError("EagerRender.backward without a forward(graph=True) before it")
        torch.autograd.backward(image, grad_image.to(image.dtype))

    def release(self) -> None:
        self._image = None


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.detach().float()
    return float((value.detach().float() - ref).norm() / ref.norm().clamp_min(1e-30))


def accumulate_grads(leaves: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> None:
    for leaf, g in zip(leaves, grads):
        if g is None:
            continue
        if leaf.grad is None:
            leaf.grad = g.detach().clone()
        else:
            leaf.grad.add_(g)


class GraphedRender:
    """The render as two CUDA graphs, captured after the first (eager) update; see the module doc.

    ``leaves`` are the tensors the optimiser updates in place and ``fn`` reads: the graphs read
    them at their addresses, so their storage must not be replaced during the run.
    """

    def __init__(self, fn: RenderFn, leaves: Sequence[torch.Tensor], device: torch.device,
                 image_tolerance: float = IMAGE_TOLERANCE, grad_tolerance: float = GRAD_TOLERANCE):
        self.fn = fn
        self.leaves: List[torch.Tensor] = list(leaves)
        self.device = torch.device(device)
        self.image_tolerance, self.grad_tolerance = float(image_tolerance), float(grad_tolerance)
        self.eager = EagerRender(fn)
        self.stream = capture_stream(self.device)
        self.state = "warm-up"          # -> "graphs" once captured and checked, or "eager"
        self.info = {"cuda_graphs": False, "reason": "not captured yet"}
        self._drop_graphs()

    # -- the two calls of a render ---------------------------------------------------------
    def forward(self, graph: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.state == "graphs":
            self._fwd.replay()
            return self._out.clone(), self._image.clone()
        if self.state == "eager":
            return self.eager.forward(graph)
        # Warm-up: the eager pass on the stream the graphs will be captured on, so that the
        # capture finds every handle, workspace and plan of that stream made already.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out, image = self.eager.forward(graph)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if graph:
            self._pending_image = image
        return out, image

    def backward(self, grad_image: torch.Tensor) -> None:
        if self.state == "graphs":
            self._grad_image.copy_(grad_image)
            self._bwd.replay()
            accumulate_grads(self.leaves, self._grads)
            return
        if self.state == "eager":
            self.eager.backward(grad_image)
            return
        before = [None if t.grad is None else t.grad.clone() for t in self.leaves]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.eager.backward(grad_image)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        eager_grads = [None if t.grad is None else (t.grad if b is None else t.grad - b)
                       for t, b in zip(self.leaves, before)]
        image, self._pending_image = self._pending_image, None
        # The noise is still the one the eager pass rendered: capture now, check against it.
        self._capture_and_check(image, grad_image, eager_grads)

    def release(self) -> None:
        """Drop the graphs and their memory pool (the run is over)."""
        self.eager.release()
        self._drop_graphs()
        if self.state == "graphs":
            self.state = "released"

    def _drop_graphs(self) -> None:
        self._fwd = self._bwd = None
        self._out = self._image = self._grad_image = None
        self._grads: Tuple[Optional[torch.Tensor], ...] = ()
        self._pending_image: Optional[torch.Tensor] = None

    # -- capture ---------------------------------------------------------------------------
    def _capture_and_check(self, eager_image: torch.Tensor, grad_image: torch.Tensor,
                           eager_grads: List[Optional[torch.Tensor]]) -> None:
        started = time.perf_counter()
        try:
            self._capture(grad_image)
            self._fwd.replay()
            self._grad_image.copy_(grad_image)
            self._bwd.replay()
            torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError as error:
            self._give_up(f"capturing ran out of GPU memory ({str(error).splitlines()[0][:160]})")
            return
        except RuntimeError as error:
            # What a graph cannot hold fails loudly here: a host sync (.item(), a Python branch
            # on a GPU value) or a copy from pageable host memory inside the model call.
            self._give_up(f"the render could not be captured ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200]})")
            return
        image_error = relative_error(self._image, eager_image)
        grad_errors = [relative_error(g, e) for g, e in zip(self._grads, eager_grads)
                       if g is not None and e is not None]
        missing = [i for i, (g, e) in enumerate(zip(self._grads, eager_grads)) if (g is None) != (e is None)]
        grad_error = max(grad_errors, default=0.0)
        self.info = {"cuda_graphs": True, "reason": "captured", "capture_s": round(time.perf_counter() - started, 3),
                     "image_rel_err": image_error, "grad_rel_err": grad_error}
        if missing or not image_error <= self.image_tolerance or not grad_error <= self.grad_tolerance:
            self._give_up(f"the replayed graph differs from the eager pass (image {image_error:.2e}, "
                          f"gradient {grad_error:.2e}; tolerances {self.image_tolerance:.0e}, "
                          f"{self.grad_tolerance:.0e})")
            return
        self.state = "graphs"
        log.info("DNO: the render runs as CUDA graphs (captured and checked in %.1f s; replay vs eager: "
                 "image %.1e, gradient %.1e)", self.info["capture_s"], image_error, grad_error)

    def _capture(self, grad_image: torch.Tensor) -> None:
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: a ComfyUI server thread asking CUDA for free memory meanwhile is harmless
        with torch.enable_grad(), torch.cuda.graph(fwd, stream=self.stream, capture_error_mode="thread_local"):
            out, image = self.fn()
        if not image.requires_grad:
            raise RuntimeError("the captured render has no autograd graph to the noise")
        self._grad_image = torch.empty_like(image)
        self._grad_image.copy_(grad_image)
        needs = [t.requires_grad for t in self.leaves]
        with torch.cuda.graph(bwd, pool=fwd.pool(), stream=self.stream, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(image, [t for t, n in zip(self.leaves, needs) if n],
                                        self._grad_image, allow_unused=True)
        grads = iter(grads)
        self._grads = tuple(next(grads) if n else None for n in needs)
        self._fwd, self._bwd = fwd, bwd
        self._out, self._image = out.detach(), image.detach()

    def _give_up(self, reason: str) -> None:
        self._drop_graphs()
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:
            pass
        self.state = "eager"
        self.info = {**self.info, "cuda_graphs": False, "reason": reason}
        log.warning("DNO: CUDA graphs are off for this run, which continues eagerly (same result, "
                    "slower): %s", reason)


def make_render(fn: RenderFn, leaves: Sequence[torch.Tensor], device: torch.device, cuda_graphs: bool):
    """The render for a run: graphed on CUDA when asked for, eager otherwise."""
    device = torch.device(device)
    if cuda_graphs and device.type == "cuda":
        return GraphedRender(fn, leaves, device)
    return EagerRender(fn, "off (cuda_graphs=False)" if not cuda_graphs else f"eager on {device.type}")
