r"""The buffer rule of a call: every sample starts from the state the call found, and a
floating-point buffer that the samples update ends at the average of their updates."""

from __future__ import annotations

__all__ = ["State"]

from collections.abc import Mapping

import torch

from torch import Tensor

from ._checks import _same_values
from ._structure import Structure


class State:
    r"""The buffers of a module around one call: a snapshot, restored on failure, and the
    update rule of a call over `n` samples.

    Each sample starts from the state the call found. When the call ends, a buffer that
    some sample changed holds the average over samples of their values if it is
    floating-point, else the value the first sample left. The buffers keep their
    identity: the call writes into them once, at the end.

    Buffers `given` per sample (`{name: (n, *shape)}`, a deep ensemble's) stand in for
    the module's own, which the call leaves alone: each sample updates its own in place,
    and a failed call puts them back as it found them.
    """

    def __init__(self, st: Structure, given: Mapping[str, Tensor] | None = None) -> None:
        self.st = st
        given = given or {}
        self.entries = [
            (name, t, t.detach().clone()) for name, t in st.buffers.items() if name not in given
        ]
        self.given = [(t, t.detach().clone()) for t in given.values()]
        self.records: dict[str, dict[int, Tensor]] = {}
        self.samples = 0

    def _changed(self, name: str, t: Tensor, clone: Tensor) -> bool:
        # By value: kernels such as batch norm's update buffers without bumping their
        # version counters.
        d, attr = self.st.buffer_slots[name][0]
        if d.get(attr) is not t:
            return True
        return not (t.shape == clone.shape and _same_values(t, clone))  # NaN as NaN

    def restore(self) -> None:
        r"""Puts every buffer back as the call found it."""

        with torch.no_grad():
            for t, clone in self.given:
                if not torch.equal(t, clone):
                    t.copy_(clone)
        self._restore_own()

    def _restore_own(self) -> None:
        with torch.no_grad():
            for name, t, clone in self.entries:
                if not self._changed(name, t, clone):
                    continue
                for d, attr in self.st.buffer_slots[name]:
                    d[attr] = t
                t.copy_(clone)

    def written(self, skip: Mapping[str, object]) -> list[str]:
        r"""Returns the names of the module's own buffers, but those in `skip` and those
        it holds no more (:meth:`reassigned`), whose values changed since the call
        began."""

        moved = self.reassigned()
        return [
            name
            for name, t, clone in self.entries
            if name not in skip and name not in moved and self._changed(name, t, clone)
        ]

    def reassigned(self) -> list[str]:
        r"""Returns the names of the module's own buffers that it holds no more: `fn`
        assigned other tensors to them (`self.ema = 0.9 * self.ema + ...`)."""

        moved = []
        for name, t, _ in self.entries:
            d, attr = self.st.buffer_slots[name][0]
            if d.get(attr) is not t:
                moved.append(name)
        return moved

    def write_assigned(self, names: list[str]) -> None:
        r"""Writes what `fn` assigned to the module's own buffers `names` in one sample's
        call into them, as the loop's rule does: detached, in place where the shape and
        dtype are the buffer's (which goes back into its places), else as a new buffer."""

        slots = self.st.buffer_slots
        with torch.no_grad():
            # Every value read before any is written (`self.prev = self.cur`).
            values = {
                name: slots[name][0][0][slots[name][0][1]].detach().clone() for name in names
            }
            for name, t, _ in self.entries:
                value = values.get(name)
                if value is None:
                    continue
                if value.shape == t.shape and value.dtype == t.dtype:
                    value = t.copy_(value)
                for d, attr in slots[name]:
                    d[attr] = value

    def fresh(self) -> dict[str, Tensor]:
        r"""Returns copies of the initial buffers for one sample of a loop to update.

        Autograd may save a buffer for the backward pass (batch norm saves its running
        statistics), so a sample never updates a tensor another sample uses.
        """

        return {name: clone.clone() for name, t, clone in self.entries if t.dtype != torch.bool}

    def current(self) -> dict[str, Tensor]:
        r"""Returns the buffers the module holds now, by name."""

        held = {}
        for name, _, _ in self.entries:
            d, attr = self.st.buffer_slots[name][0]
            held[name] = d[attr]
        return held

    def collect(self, held: dict[str, Tensor]) -> None:
        r"""Records what one sample of a loop left in the buffers (`held`, from
        :meth:`current`), and puts back any buffer it updated in place."""

        i = self.samples
        for name, t, clone in self.entries:
            value = held[name]
            if value.shape == clone.shape and torch.equal(value, clone):
                continue
            record = value.detach().clone() if value is t else value.detach()
            self.records.setdefault(name, {})[i] = record
        self.samples += 1
        self._restore_own()

    def finish(self) -> None:
        r"""Writes the update rule's result over the samples of a loop into the buffers."""

        with torch.no_grad():
            for name, t, clone in self.entries:
                records = self.records.get(name)
                if not records:
                    continue
                values = [records.get(i, clone) for i in range(self.samples)]
                first = values[0]
                if first.shape != t.shape or first.dtype != t.dtype:
                    for d, attr in self.st.buffer_slots[name]:
                        d[attr] = first
                elif t.is_floating_point() or t.is_complex():
                    t.copy_(torch.stack(values).mean(0))
                else:
                    t.copy_(first)

    def given_held(self, given: Mapping[str, Tensor]) -> dict[str, Tensor]:
        r"""Returns the tensors that hold the given buffers' places now, by name, where
        they are not `given`'s: `fn` assigned others to them."""

        slots = self.st.buffer_slots
        held = {}
        for name, t in given.items():
            d, attr = slots[name][0]
            if d[attr] is not t:
                held[name] = d[attr]
        return held

    def write_given(
        self, where: str, given: Mapping[str, Tensor], held: dict[str, Tensor]
    ) -> None:
        r"""Writes what `fn` assigned to given buffers (`held`, from :meth:`given_held`)
        into them, in place: they are the caller's, per sample."""

        with torch.no_grad():
            # Every value read before any is written: `self.prev = self.cur` holds a given
            # buffer that another assignment overwrites.
            held = {name: value.clone() for name, value in held.items()}
            for name, value in held.items():
                t = given[name]
                if value.shape != t.shape:
                    raise RuntimeError(
                        f"{where}: fn assigned a tensor of shape {tuple(value.shape)} to the "
                        f"buffer {name!r}, given per sample with shape {tuple(t.shape)}"
                    )
                t.copy_(value)

    def set_averaged(self, name: str, stack: Tensor) -> None:
        r"""Writes a vectorized call's per-sample buffer values `(n, *shape)` by the rule;
        a buffer that no sample changed is left as it is (the mean of equal values may
        round differently)."""

        t = self.st.buffers[name]
        with torch.no_grad():
            if torch.equal(stack, t.unsqueeze(0).expand_as(stack)):
                return
            if t.is_floating_point() or t.is_complex():
                t.copy_(stack.mean(0))
            else:
                t.copy_(stack[0])
