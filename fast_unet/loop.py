"""The training step's pieces: what ``python -m fast_unet.train`` runs, usable from a user's own loop.

- ``make_optimizer(params, "adamw" | "sgd", lr, weight_decay, device, capturable=False)``: AdamW with
  ``fused=True`` where the device has the fused kernel (CUDA, and the CPU in this torch), else
  ``foreach=True``; ``capturable=True`` for a step replayed in a CUDA graph. ``load_optimizer_state``: a
  checkpoint's optimizer state into it, keeping its own implementation flags.
- ``ema_update(ema_params, params, weight)``: ``ema += weight * (param - ema)`` for every tensor in one
  ``torch._foreach_lerp_``; ``weight`` is a float or a 0-dim tensor (a tensor keeps a CUDA graph valid when it
  changes). ``ema_weight(step, decay)``: the usual warm-up, ``1 - min(decay, (1 + step) / (10 + step))``.
- ``TrainStep(model, ema, optimizer, diffusion, autocast_dtype=None, graph=False)``: ``step(x0, t, eps,
  ema_w)`` runs ``q_sample``, the forward (under ``torch.autocast`` when ``autocast_dtype`` is given), the MSE
  on the noise, backward, the optimizer and the EMA update, and returns the loss as a 0-dim float32 tensor on
  the device (nothing waits for the device). With ``graph=True`` on CUDA the first call warms the step up on a
  side stream, puts the model, EMA and optimizer state back as they were, captures it in a
  ``torch.cuda.CUDAGraph``; each call copies its inputs into the graph's static tensors and replays it. The
  step function is the same eager function either way. Hyperparameters changed after the capture (the
  optimizer's ``lr``) are not seen by the replays.
- ``LossLog(capacity, device)``: the losses of the steps since the last read in a device buffer; ``read()``
  moves them to the host in one copy (with DDP: one all-reduce that also carries a stop flag).
- ``Prefetch(make, depth=2)``: calls ``make()`` on a background thread, ``depth`` results ahead.

A loop of one's own::

    opt = make_optimizer(model.parameters(), "adamw", 3e-4, 0.01, device, capturable=graph)
    step = TrainStep(model, ema, opt, diffusion, autocast_dtype=torch.bfloat16, graph=graph)
    log = LossLog(50, device)
    for n, (x0, t, eps) in enumerate(batches):
        log.add(step(x0, t, eps, ema_weight(n, 0.999)))
        if (n + 1) % 50 == 0:
            print(log.read()[0])
"""
import contextlib
import queue
import threading

import torch
import torch.nn.functional as F

__all__ = ["LossLog", "Prefetch", "TrainStep", "ema_update", "ema_weight", "load_optimizer_state", "make_optimizer"]


def _fused_devices():
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return set(_get_fused_kernels_supported_devices())
    except ImportError:
        return {"cuda"}


def make_optimizer(params, kind, lr, weight_decay, device, capturable=False):
    """AdamW (fused where ``device``'s type has the fused kernel, else foreach) or SGD without momentum."""
    params = list(params)
    dev = torch.device(device).type
    if kind == "adamw":
        if dev in _fused_devices():
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True,
                                     capturable=capturable and dev == "cuda")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True, capturable=capturable)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {kind!r}")


def load_optimizer_state(optimizer, state):
    """``optimizer.load_state_dict(state)`` keeping this optimizer's implementation (``fused``, ``foreach``,
    ``capturable``: the state dict carries the writer's), with the step counters where it needs them."""
    keys = ("fused", "foreach", "capturable")
    mine = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, flags in zip(optimizer.param_groups, mine):
        g.update(flags)
        on_device = g.get("fused") or g.get("capturable")
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


def ema_weight(step, decay):
    """``1 - min(decay, (1 + step) / (10 + step))``: the EMA's warm-up, so a short run's EMA is not the init."""
    return 1 - min(decay, (1 + step) / (10 + step))


def ema_update(ema_params, params, weight):
    """``e.lerp_(p, weight)`` for every pair, as one ``torch._foreach_lerp_``."""
    torch._foreach_lerp_(list(ema_params), list(params), weight)


def _ema_tensors(module):
    """The EMA's floating-point parameters and buffers (integer buffers are copied, not averaged)."""
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]


class TrainStep:
    """One training step, eager or replayed from a CUDA graph (see the module docstring)."""

    def __init__(self, model, ema, optimizer, diffusion, autocast_dtype=None, graph=False):
        self.model, self.optimizer, self.diffusion = model, optimizer, diffusion
        self.autocast_dtype = autocast_dtype
        base = model.module if hasattr(model, "module") else model
        self.params = _ema_tensors(base)
        self.ema_params = _ema_tensors(ema)
        if len(self.params) != len(self.ema_params):
            raise ValueError(f"ema has {len(self.ema_params)} floating-point tensors, the model "
                             f"{len(self.params)}")
        self.device = self.params[0].device
        self.graph = graph and self.device.type == "cuda"
        self._graph = None
        self._static = None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # A CUDA graph must not replay autocast's cast cache of another step.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.graph)

    def run(self, x0, t, eps, ema_w):
        """The step itself, eagerly: the function a graph captures."""
        x_t = self.diffusion.q_sample(x0, t, eps)
        with self._autocast():
            pred = self.model(x_t, t)
        loss = F.mse_loss(pred.float(), eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            ema_update(self.ema_params, self.params, ema_w)
        return loss.detach()

    def __call__(self, x0, t, eps, ema_w):
        if not self.graph:
            return self.run(x0, t, eps, ema_w)
        if self._graph is None:
            self._capture(x0, t, eps)
        s = self._static
        s["x0"].copy_(x0, non_blocking=True)
        s["t"].copy_(t, non_blocking=True)
        s["eps"].copy_(eps, non_blocking=True)
        s["w"].fill_(ema_w)
        self._graph.replay()
        return s["loss"].clone()

    def _state_tensors(self):
        opt = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        return list(self.params) + list(self.ema_params) + opt

    def _capture(self, x0, t, eps):
        s = {"x0": x0.detach().clone(), "t": t.detach().clone(), "eps": eps.detach().clone(),
             "w": torch.zeros((), dtype=torch.float32, device=self.device)}
        # Warm-up changes the weights and the optimizer's state: they are put back afterwards, in place (a
        # state tensor the warm-up created starts at zero, as the optimizer's own first step makes it).
        saved = {id(v): v.detach().clone() for v in self._state_tensors()}
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.run(s["x0"], s["t"], s["eps"], s["w"])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            s["loss"] = self.run(s["x0"], s["t"], s["eps"], s["w"])
        with torch.no_grad():
            for v in self._state_tensors():
                if id(v) in saved:
                    v.copy_(saved[id(v)])
                else:
                    v.zero_()
        torch.cuda.synchronize(self.device)
        self._graph, self._static = graph, s


class LossLog:
    """Losses kept on the device until read: ``add(loss)`` is one device copy, ``read()`` one host copy."""

    def __init__(self, capacity, device):
        self.capacity = capacity
        self.buf = torch.zeros(capacity + 1, dtype=torch.float32, device=device)
        self.n = 0

    def __len__(self):
        return self.n

    def add(self, loss):
        if self.n >= self.capacity:
            raise RuntimeError(f"LossLog holds {self.capacity} losses: read() it first")
        self.buf[self.n].copy_(loss, non_blocking=True)
        self.n += 1

    def read(self, world=1, flag=False):
        """``(losses, any_flag)``: the losses added since the last read as floats (with ``world > 1``, each the
        mean over the ranks: one all-reduce) and whether ``flag`` was set on any rank."""
        n, self.n = self.n, 0
        part = self.buf[:n + 1]
        part[n].fill_(1.0 if flag else 0.0)
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(part, op=dist.ReduceOp.SUM)
            part[:n].div_(world)
        values = part.tolist()
        return values[:n], values[n] > 0


class Prefetch:
    """``make()`` called on a background thread, up to ``depth`` results ahead; ``next()`` returns them in
    order and re-raises the thread's exception. ``close()`` stops the thread."""

    def __init__(self, make, depth=2):
        self._make = make
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="fast_unet-prefetch", daemon=True)
        self._thread.start()

    def _work(self):
        try:
            while not self._stop.is_set():
                item = (True, self._make())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # handed to the consumer
            self._queue.put((False, e))

    def next(self):
        ok, item = self._queue.get()
        if not ok:
            raise item
        return item

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
