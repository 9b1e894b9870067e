"""AdamW whose two moments are stored in 8 bits per value: 2 bytes of optimizer state per parameter
instead of 8, for the memory of post-training the release UNet (739 M parameters: 5.9 GB of float32
moments, more than half the naive step's peak on an H100; bench/bench_posttrain.py).

The update itself is AdamW's, in float32, from the dequantized moments; only what is kept between
steps is 8-bit (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"):
- blocks of BLOCK consecutive values share one float32 scale, their largest magnitude, so an
  outlier only coarsens its own block;
- codes index a 256-entry table of a "dynamic" type: decades 1e-6 .. 1 of the scale, with twice
  as many steps in each decade as in the one below (relative steps ~1.4 % near the scale, coarser
  far below it), signed for the first moment m, unsigned for the second moment's square root
  sqrt(v) (as sqrt(v) spans the same decades as m: v itself would run out of range 10^6 times
  sooner, and an element whose v rounds to 0 under a nonzero m takes a step of m / eps);
- rounding is stochastic, unbiased in m and in v: round-to-nearest cannot follow an average whose
  step per update is below half a code step (with beta2 = 0.999, v would never decay), while
  stochastic rounding keeps the moving averages exact in expectation. Its random numbers are a
  hash of (seed, parameter, step, element): a resumed run draws the same ones.
Parameters under MIN_8BIT_NUMEL values (biases, norms) keep float32 moments: their memory is nothing
and their precision is worth more. The state follows each parameter's logical (contiguous) order
whatever its memory format, so checkpoints resume under any layout.
A limit of the format: values whose sqrt(v) sits five or more decades below their block's largest
fall in the coarse bottom codes, and their steps grow (measured over 300 steps: ~1.08x AdamW's at
1e-5..1e-3 of the block's largest gradient, ~1.35x at 1e-6..1e-5, several times below that).

`adamw8bit_update` below is the plain-torch definition; the step runs as one pass per parameter in
C++ on the CPU (csrc/cpu/adamw8bit.cpp) and in a Triton kernel on CUDA
(ldmfast/train/adamw8bit_triton.py).
"""
from __future__ import annotations

import math
import os
from typing import Iterable, NamedTuple

import torch

BLOCK = 256
MIN_8BIT_NUMEL = 4096
_CHUNK = 1 << 20  # values per piece of the plain-torch update (bounds its temporaries: ~40 MB)
_MASK32 = 0xFFFFFFFF
_FLOAT32_MAX = torch.finfo(torch.float32).max
_GOLDEN = 0x9E3779B9


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted, distinct float32 values a code stands for (times its block's scale): 0, and
    per decade i = 0..6 (values in (10^(i-7), 10^(i-6)]) 2^i evenly spaced values (signed: of each
    sign) or 2^(i+1) (unsigned); the top decade's positive side one more, to fill 256 (1 is the
    top value: a block's largest magnitude is kept exactly)."""
    def magnitudes(per_decade, extra_top):
        values = []
        for i in range(7):
            steps = per_decade(i) + (extra_top if i == 6 else 0)
            values += [10.0 ** (i - 6) * (0.1 + 0.9 * (j + 1) / steps) for j in range(steps)]
        return values

    if signed:
        values = [-v for v in magnitudes(lambda i: 2 ** i, 0)] + [0.0] + magnitudes(lambda i: 2 ** i, 1)
    else:
        values = [0.0] + magnitudes(lambda i: 2 ** (i + 1), 1)
    table = torch.tensor(sorted(values), dtype=torch.float64).float()
    if table.numel() != 256 or not bool((table[1:] > table[:-1]).all()):
        raise AssertionError("the dynamic code must hold 256 distinct sorted values")
    return table


def _hash32(x):
    """A 32-bit integer hash (lowbias32's shifts, multipliers below 2^31 so that int64 products do
    not overflow) of x in [0, 2^32): an int64 tensor, or a Python int (stream_key: no tensor on the
    per-parameter path). The C++ loop and the Triton kernel compute the same in uint32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int, which: int) -> int:
    """The offset of one random stream: which = 0 for m, 1 for v, at one step of one parameter."""
    return _hash32((seed * _GOLDEN + step * 2 + which) & _MASK32)


class StepScalars(NamedTuple):
    """The scalars of one step as every implementation takes them, computed once in double and
    rounded by the callee (so that the three round alike)."""
    one_minus_beta1: float
    one_minus_beta2: float
    bc1: float           # bias corrections 1 - beta^step
    bc2: float
    decay_factor: float  # 1 - lr * weight_decay
    key_m: int           # the step's random streams
    key_v: int


def step_scalars(step: int, *, lr: float, beta1: float, beta2: float, weight_decay: float, seed: int) -> StepScalars:
    return StepScalars(1.0 - beta1, 1.0 - beta2, 1.0 - beta1 ** step, 1.0 - beta2 ** step, 1.0 - lr * weight_decay,
                       stream_key(seed, step, 0), stream_key(seed, step, 1))


def uniforms(first: int, count: int, key: int, device) -> torch.Tensor:
    """count uniform float32 numbers in [0, 1) for elements first .. first + count - 1 of a stream."""
    idx = torch.arange(first, first + count, dtype=torch.int64, device=device)
    return (_hash32((idx + key) & _MASK32) >> 8).float() * (1.0 / (1 << 24))


_KEY_SHIFT = 14  # a float32's top 18 bits (sign, exponent, 9 of the mantissa's bits) key the index table
_INDEX_TABLES: dict = {}


def _index_table(code: torch.Tensor) -> torch.Tensor:
    """For each 18-bit key of a float32, the largest i with code[i] <= every float of that key
    (clamped to 0..254). A key's floats span a 2^-9 relative range, less than any two codes' gap
    (1/129 of the top decade, the finest), so at most one code lies inside it: lower_index
    moves up by one where it does."""
    cache_key = (code.device, bool(code[0] < 0))  # (the two tables: signed or not)
    if cache_key not in _INDEX_TABLES:
        keys = torch.arange(1 << 18, dtype=torch.int64)
        low_bits = torch.where(keys >= (1 << 17), (1 << _KEY_SHIFT) - 1, 0)  # negatives: most negative float
        lowest = ((keys << _KEY_SHIFT) | low_bits).to(torch.int32).view(torch.float32)
        lowest = torch.nan_to_num(lowest, nan=0.0).clamp(-1.0, 1.0)  # (keys past 1 are never looked up)
        table = (torch.searchsorted(code.cpu(), lowest, right=True) - 1).clamp(0, 254)
        _INDEX_TABLES[cache_key] = table.to(torch.uint8).to(code.device)
    return _INDEX_TABLES[cache_key]


def lower_index(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """searchsorted(code, x, right=True) - 1 clamped to 0..254, for x in [code[0], 1] (int64): a
    table lookup on x's top bits and one correction (searchsorted's binary search took 60 % of a
    CPU step)."""
    keys = (x.contiguous().view(torch.int32).long() & _MASK32) >> _KEY_SHIFT
    idx = _index_table(code)[keys].long()
    return idx + ((code[(idx + 1).clamp_(max=255)] <= x) & (idx < 254))


def quantize(x: torch.Tensor, code: torch.Tensor, u: torch.Tensor, squared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (nblocks, BLOCK), scales float32 (nblocks,)) of x (nblocks, BLOCK), rounded to
    the code below or above at random (u: uniforms of x's shape), unbiased in x, or in x^2 where
    `squared` (x = sqrt(v): unbiased in v)."""
    # (NaN left out of the scale, as the C++ and Triton maxima do: it poisons its own value only.
    # At least float32's smallest normal: the scale stored is the one divided by.)
    scale = torch.nan_to_num(x.abs(), nan=0.0).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    xn = (x / scale[:, None]).clamp_(-1.0, 1.0)
    lo_idx = lower_index(code, xn)
    lo, hi = code[lo_idx], code[lo_idx + 1]
    if squared:
        p = (xn * xn - lo * lo) / (hi * hi - lo * lo)
    else:
        p = (xn - lo) / (hi - lo)
    return (lo_idx + (u < p)).to(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return code[codes.long()] * scale[:, None]


def adamw8bit_update(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, seed: int, codes: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One AdamW step of the flat float32 parameter p (n,) with gradient g (n,) and 8-bit state
    (m_codes, m_scale, r_codes, r_scale; state["step"] already counts this step), in place, a
    chunk of whole blocks at a time. codes: the signed and unsigned tables on p's device."""
    n = p.numel()
    signed, unsigned = codes
    k = step_scalars(state["step"], lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, seed=seed)
    blocks = state["m_scale"].numel()
    per = _CHUNK // BLOCK
    for b0 in range(0, blocks, per):
        b1 = min(blocks, b0 + per)
        e0, e1 = b0 * BLOCK, min(n, b1 * BLOCK)
        nb, pad = b1 - b0, b1 * BLOCK - min(n, b1 * BLOCK)
        gb = torch.nn.functional.pad(g[e0:e1].float(), (0, pad)).view(nb, BLOCK)
        m = dequantize(state["m_codes"][b0:b1], state["m_scale"][b0:b1], signed)
        r = dequantize(state["r_codes"][b0:b1], state["r_scale"][b0:b1], unsigned)
        m.mul_(beta1).add_(gb, alpha=k.one_minus_beta1)
        # (v at most float32's largest: an overflowing g^2 would make the block's scale inf, and
        # code 0 x inf NaN for all its values at the next step)
        v = (r * r).mul_(beta2).addcmul_(gb, gb, value=k.one_minus_beta2).clamp_(max=_FLOAT32_MAX)
        update = (m / k.bc1) / ((v / k.bc2).sqrt_().add_(eps))
        pv = p[e0:e1]
        pv.mul_(k.decay_factor).add_(update.view(-1)[: e1 - e0], alpha=-lr)
        u_m = uniforms(e0, nb * BLOCK, k.key_m, p.device).view(nb, BLOCK)
        u_v = uniforms(e0, nb * BLOCK, k.key_v, p.device).view(nb, BLOCK)
        state["m_codes"][b0:b1], state["m_scale"][b0:b1] = quantize(m, signed, u_m, squared=False)
        state["r_codes"][b0:b1], state["r_scale"][b0:b1] = quantize(v.sqrt_(), unsigned, u_v, squared=True)


def cpu_update(p: torch.Tensor, g: torch.Tensor, state: dict, tables: tuple[torch.Tensor, torch.Tensor], *,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, seed: int) -> bool:
    """adamw8bit_update's step through the C++ loop of csrc/cpu/adamw8bit.cpp (one pass, threaded; p
    and g flat and contiguous); False where ldmfast._C is missing."""
    from ldmfast.ops import _native
    module = _native.cpu_module()
    if module is None:
        return False
    k = step_scalars(state["step"], lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, seed=seed)
    module.adamw8bit_step(p.data_ptr(), g.data_ptr(), state["m_codes"].data_ptr(), state["m_scale"].data_ptr(),
                          state["r_codes"].data_ptr(), state["r_scale"].data_ptr(), tables[0].data_ptr(),
                          tables[1].data_ptr(), p.numel(), lr, beta1, k.one_minus_beta1, beta2, k.one_minus_beta2, eps,
                          k.bc1, k.bc2, k.decay_factor, k.key_m, k.key_v, _index_table(tables[0]).data_ptr(),
                          _index_table(tables[1]).data_ptr(), torch.get_num_threads())
    return True


def _triton_module(p: torch.Tensor):
    """adamw8bit_triton where its kernels could run (CUDA tensors, or CPU ones under Triton's
    interpreter), else None, and None without Triton (an optional dependency): the C++ loop and the
    plain-torch definition then step."""
    if not (p.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    global _TRITON_KERNELS
    if _TRITON_KERNELS is None:  # (imported once: an import statement per call cost host time)
        try:
            from . import adamw8bit_triton
        except ImportError:
            _TRITON_KERNELS = False
        else:
            _TRITON_KERNELS = adamw8bit_triton
    return _TRITON_KERNELS or None


_TRITON_KERNELS = None  # adamw8bit_triton once imported, False where it cannot be


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with 8-bit moments
    (module docstring). The stochastic rounding of the parameter at position i (counted across
    groups) draws from stream seed + i: optimizers over parts of a model (StepInBackward's, one per
    parameter) draw what one over all of it does when each gets seed + its first position."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, seed: int = 0):
        if not lr >= 0.0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: each must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # (Not a group setting: load_state_dict would give every StepInBackward optimizer the first's.)
        self.seed = seed
        self._codes: dict = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            self._codes[device] = (dynamic_code(True).to(device), dynamic_code(False).to(device))
        return self._codes[device]

    @staticmethod
    def _new_state(p: torch.Tensor) -> dict:
        if p.numel() < MIN_8BIT_NUMEL:
            return {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        blocks = math.ceil(p.numel() / BLOCK)
        zero_m = 127  # the signed table's 0 (127 negative values below it)
        return {"step": 0,
                "m_codes": torch.full((blocks, BLOCK), zero_m, dtype=torch.uint8, device=p.device),
                "m_scale": torch.zeros(blocks, dtype=torch.float32, device=p.device),
                "r_codes": torch.zeros((blocks, BLOCK), dtype=torch.uint8, device=p.device),
                "r_scale": torch.zeros(blocks, dtype=torch.float32, device=p.device)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update_parameters()
        return loss

    def update_parameters(self) -> None:
        """step()'s update without what torch.optim.Optimizer wraps around a step (its step hooks,
        a profiler range, the grad-mode switch): StepInBackward runs one optimizer per parameter
        inside the backward, where that wrapping cost more host time than the update's launch
        (~35 of ~42 us per parameter on a CPU core with the kernel stubbed out; a release UNet has 278
        parameters)."""
        if torch.is_grad_enabled():  # (a backward with create_graph: the update is no graph's)
            with torch.no_grad():
                return self.update_parameters()
        first = 0  # parameters of the groups before this one: one numbering across groups
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("params: 8-bit AdamW does not take sparse gradients")
                if p.dtype != torch.float32:
                    raise ValueError(f"params: 8-bit AdamW updates float32 parameters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                if "exp_avg" in state:
                    self._step_small(p, state, group)
                    continue
                self._step_8bit(p, state, group, seed=(self.seed + first + index) & _MASK32)
            first += len(group["params"])

    def _step_8bit(self, p: torch.Tensor, state: dict, group: dict, seed: int) -> None:
        # The state follows the parameter's logical (contiguous) order whatever its memory format, so
        # that checkpoints (which store tensors contiguous) resume under any layout: the Triton kernel
        # reads and writes a channels-last weight (up to 4 dims) in place, the other paths step
        # through a contiguous copy.
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], seed=seed)
        kernels, tables, data = _triton_module(p), self._tables(p.device), p.data
        if kernels is not None and data.dim() <= kernels.MAX_STRIDED_DIMS and \
                kernels.update(data, p.grad, state, tables, **hyper):
            return
        work = data if data.is_contiguous() else data.contiguous()
        flat_p, flat_g = work.view(-1), p.grad.contiguous().view(-1)
        if not (kernels is not None and kernels.update(flat_p, flat_g, state, tables, **hyper)):
            if not (p.device.type == "cpu" and cpu_update(flat_p, flat_g, state, tables, **hyper)):
                adamw8bit_update(flat_p, flat_g, state, codes=tables, **hyper)
        if work is not data:
            data.copy_(work)

    def _step_small(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """A small parameter's step: float32 moments (in one Triton launch on CUDA)."""
        kernels = _triton_module(p)
        beta1, beta2 = group["betas"]
        if kernels is not None and p.is_contiguous() and p.grad.is_contiguous() and \
                state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous() and \
                kernels.update_float32(p, p.grad, state, lr=group["lr"], beta1=beta1, beta2=beta2,
                                       eps=group["eps"], weight_decay=group["weight_decay"]):
            return
        self._step_float32(p, state, group)

    @staticmethod
    def _step_float32(p: torch.Tensor, state: dict, group: dict) -> None:
        """torch.optim.AdamW's update, for the small parameters that keep float32 moments."""
        beta1, beta2 = group["betas"]
        step = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(group["eps"])
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1.0 - beta1 ** step))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, with two differences. The codes skip torch's cast of every state tensor to its
        parameter's dtype (float32 copies of all codes at once: 4x the 8-bit state's memory), and
        their shapes are checked against the parameters (a kernel would write past a smaller state).
        And a float32 AdamW state (exp_avg, exp_avg_sq) is taken too, quantized at once: a run may
        switch to 8 bits on resume."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        codes: dict = {}
        state = {}
        for pid, entries in state_dict["state"].items():
            entries = dict(entries)
            codes[pid] = {k: entries.pop(k) for k in ("m_codes", "r_codes") if k in entries}
            state[pid] = entries
        super().load_state_dict({**state_dict, "state": state})
        for index, (pid, p) in enumerate(zip(saved_ids, params)):
            if pid not in state_dict["state"]:
                continue
            st = self.state[p]
            st.update({k: v.to(device=p.device, dtype=torch.uint8) for k, v in codes[pid].items()})
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = int(st["step"].item())
            self._check_loaded(index, p, st)
            if "exp_avg" in st and p.numel() >= MIN_8BIT_NUMEL:
                self._quantize_loaded(p, st)

    @staticmethod
    def _check_loaded(index: int, p: torch.Tensor, state: dict) -> None:
        blocks = math.ceil(p.numel() / BLOCK)
        expected = {"m_codes": (blocks, BLOCK), "r_codes": (blocks, BLOCK), "m_scale": (blocks,),
                    "r_scale": (blocks,), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        for key, shape in expected.items():
            if key in state and tuple(state[key].shape) != shape:
                raise ValueError(f"state_dict: parameter {index} (shape {tuple(p.shape)}) needs {key} of shape "
                                 f"{shape}, got {tuple(state[key].shape)}")
        if ("m_codes" in state) == ("exp_avg" in state):
            raise ValueError(f"state_dict: parameter {index} needs either 8-bit moments (m_codes, ...) or "
                             f"float32 ones (exp_avg, exp_avg_sq); got {sorted(state)}")

    def _quantize_loaded(self, p: torch.Tensor, state: dict) -> None:
        signed, unsigned = self._tables(p.device)
        new = self._new_state(p)
        n = p.numel()
        blocks = new["m_scale"].numel()
        pad = blocks * BLOCK - n
        m = torch.nn.functional.pad(state.pop("exp_avg").float().reshape(-1), (0, pad)).view(blocks, BLOCK)
        r = torch.nn.functional.pad(state.pop("exp_avg_sq").float().reshape(-1), (0, pad)).sqrt_().view(
            blocks, BLOCK)
        half = torch.full_like(m, 0.5)  # (round to nearest: nothing to keep unbiased across steps here)
        new["m_codes"], new["m_scale"] = quantize(m, signed, half, squared=False)
        new["r_codes"], new["r_scale"] = quantize(r, unsigned, half, squared=True)
        new["step"] = state["step"]
        state.clear()
        state.update(new)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimizer's state (any optimizer)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
