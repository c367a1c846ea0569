"""DoRA (weight-decomposed LoRA, PEFT's `use_dora`) per slot of one linear layer, for any per-row scale.

PEFT's DoRA forward for a row at LoRA scaling s (alpha/r times the request's scale c) is
    y = bias + g * (x W^T + s x A^T B^T),   g = m / ||W + s B A||_row   (one norm per output feature)
The LoRA part is exactly what the ops already add, so DoRA only rescales a layer's output: y <- bias + g * (y - bias).

The norm depends on the scale, and requests choose their own. Instead of caching norms per distinct scale, each slot
keeps three vectors from which any scale's norm follows exactly:
    ||W + c D||^2 = p + 2 c q + c^2 u,   p = ||W_row||^2, q = <W_row, D_row>, u = ||D_row||^2
with D = Bt^T A (alpha/r folded into Bt). q costs one [out, in] x [in, r] product at slot load, u an r x r Gram
matrix, p one pass over W per layer; a step then pays a few element-wise ops per DoRA row, and a fixed batch (CUDA
graphs) runs the same math over every row with a mask. Scale 0 rows are left alone: bit for bit the base model
(PEFT's formula would still rescale them by m / ||W||). The vectors are summed in float64 at load and kept in
float32, whatever the model's dtype.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class DoraSlots:
    def __init__(self, weight: torch.Tensor, max_loras: int):
        kw = dict(dtype=torch.float32, device=weight.device)
        out = weight.shape[0]
        self.p = weight.double().square().sum(1).float()  # [out]; float64 sums: 1e-4 after 30 layers needs them
        self.magnitude = torch.zeros(max_loras, out, **kw)
        self.q = torch.zeros(max_loras, out, **kw)
        self.u = torch.zeros(max_loras, out, **kw)
        self.on = torch.zeros(max_loras, dtype=torch.bool, device=weight.device)  # slots holding DoRA here
        self.slots: set[int] = set()
        # Gains per batch composition: decode steps repeat the same (slot, scale) pairs step after step.
        self._gains: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def load(self, slot: int, weight: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, magnitude: torch.Tensor) -> None:
        """`A` [r, in], `Bt` [r, out] as the slot holds them (scaling folded in), `magnitude` [out]."""
        w, a, b = weight.double(), A.to(weight.device, torch.float64), Bt.to(weight.device, torch.float64).t()
        self.q[slot] = (b * (w @ a.t())).sum(1).float()  # <W_row, (B A)_row> = B_row . (W A^T)_row
        self.u[slot] = ((b @ (a @ a.t())) * b).sum(1).float()  # ||B_row A||^2 = B_row (A A^T) B_row^T
        self.magnitude[slot].copy_(magnitude, non_blocking=True)
        self.on[slot] = True
        self.slots.add(slot)
        self._gains.clear()

    def clear(self, slot: int) -> None:
        if slot in self.slots:
            self.on[slot] = False
            self.slots.discard(slot)
            self._gains.clear()

    def gain(self, slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """g [n, out] for rows using `slots` [n] at scales `scales` [n]."""
        c = scales.to(torch.float32).unsqueeze(1)
        norm2 = self.p + 2 * c * self.q.index_select(0, slots) + c * c * self.u.index_select(0, slots)
        return self.magnitude.index_select(0, slots) * norm2.rsqrt()

    def pair_gains(self, pairs: tuple, slots: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[1 + E, out] in `dtype`: row 0 all ones (rows without a DoRA pair), then the gain of each (slot, scale)
        pair (`pairs`, as `slots` and `scales` tensors too), 1 where the slot holds no DoRA weights in this layer.
        Ones stay exactly 1, so y * g leaves those rows bit for bit. Kept for the last 8 compositions."""
        key = (pairs, dtype)
        found = self._gains.get(key)
        if found is None:
            found = self._gains[key] = self._pair_gains(slots, scales, dtype)
            while len(self._gains) > 8:
                self._gains.popitem(last=False)
        else:
            self._gains.move_to_end(key)
        return found

    def _pair_gains(self, slots: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        g = torch.where(self.on.index_select(0, slots).unsqueeze(1), self.gain(slots, scales),
                        torch.ones((), device=self.p.device))
        return torch.cat([torch.ones(1, g.shape[1], device=g.device), g]).to(dtype)

    @staticmethod
    def apply(y: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> None:
        """In place: y <- bias + g * (y - bias), with g broadcast over y's leading dims; where g is 1, y stays bit
        for bit (y + 0 * (y - bias) = y)."""
        if bias is None:
            y.mul_(g)
        else:
            y.add_((y - bias).mul_(g - 1))

    def rescale_fixed(self, y: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None) -> None:
        """Every row (a fixed batch: shapes never change, no host sync); rows off DoRA or at scale 0 keep y."""
        use = (self.on.index_select(0, slots) & (scales != 0)).unsqueeze(1)
        yf = y.float()
        g = self.gain(slots, scales)
        new = yf.mul(g) if bias is None else (yf - bias.float()).mul_(g).add_(bias.float())
        y.copy_(torch.where(use, new.to(y.dtype), y))
