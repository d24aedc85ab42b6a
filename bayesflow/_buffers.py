r"""The buffer rule of a call: every sample starts from the state the call found, and a
floating-point buffer that the samples update ends at the average of their updates."""

from __future__ import annotations

__all__ = ["State"]

from collections.abc import Mapping
from typing import Any

import torch

from torch import Tensor

from ._checks import _same_values
from ._structure import Slot, Structure, _held

# The key under which :meth:`State.current` gives the places that held no tensor when the
# call began (a buffer registered as None, or by `fn`) and hold one now.
_NEW: Any = object()


def _moved(t: Tensor, slots: list[Slot]) -> bool:
    r"""Whether a place of `slots` holds another object than the buffer `t`."""

    d, attr = slots[0]  # a table: most buffers have no other place
    if d.get(attr) is not t:
        return True
    return len(slots) > 1 and any(_held(d, attr) is not t for d, attr in slots)


def _rule(values: list[Tensor]) -> Tensor:
    r"""The value of a place that the samples left `values` in: their average if they are
    floating-point tensors of one shape and dtype, else the first sample's."""

    first = values[0]
    if (first.is_floating_point() or first.is_complex()) and all(
        v.shape == first.shape and v.dtype == first.dtype for v in values
    ):
        return torch.stack(values).mean(0)
    return first


class State:
    r"""The buffers of a module around one call: a snapshot, restored on failure, and the
    update rule of a call over `n` samples.

    Each sample starts from the state the call found. When the call ends, a buffer that
    some sample changed holds the average over samples of their values if it is
    floating-point, else the value the first sample left. The buffers keep their
    identity: the call writes into them once, at the end.

    A buffer that `fn` assigns another tensor to (`self.ema = 0.9 * self.ema + ...`) is
    written back by the same rule, into the buffer where the shape and dtype allow. Every
    place that holds a buffer is watched: where `fn` assigns through some of the places of
    a tied buffer only (`self.l2.pe = ...` with `l1.pe is l2.pe`), as a plain forward,
    those places get the rule's value, a tensor of their own, and the others keep the
    buffer. A place that held no tensor when the call began (a buffer registered as
    :py:`None`, or registered by `fn`) ends with the rule's value over what the samples
    left there (a new tensor), or as it was where the first sample left it empty; a
    failed call leaves it empty (or absent) again.

    Buffers `given` per sample (`{name: (n, *shape)}`, a deep ensemble's) stand in for
    the module's own, which the call leaves alone: each sample updates its own in place,
    and a failed call puts them back as it found them.
    """

    def __init__(self, st: Structure, given: Mapping[str, Tensor] | None = None) -> None:
        self.st = st
        given = given or {}
        slots = st.buffer_slots
        if st.plain:
            # A plain list or dict that holds a buffer is the module's own state: what fn
            # does to it follows no rule, as for any plain attribute.
            plain = st.plain
            slots = {k: [s for s in v if id(s[0]) not in plain] for k, v in slots.items()}
        self.entries = [
            (name, t, t.detach().clone(), slots[name])
            for name, t in st.buffers.items()
            if name not in given
        ]
        self.given = [(t, t.detach().clone()) for t in given.values()]
        self.records: dict[str, dict[int, Tensor]] = {}
        # Per tied buffer that a sample assigned through some of its places only: per
        # sample, what it left in those places, by their index among the buffer's slots.
        self.split: dict[str, dict[int, dict[int, Tensor]]] = {}
        # Per place that held no tensor: what each sample left there, and the place.
        self.filled: dict[str, dict[int, Any]] = {}
        self.places: dict[str, tuple[Any, str, set | None, bool]] = {}
        self.samples = 0
        self._fresh: dict[str, Tensor] = {}

    def _changed(self, t: Tensor, clone: Tensor, slots: list[Slot]) -> bool:
        # By value: kernels such as batch norm's update buffers without bumping their
        # version counters.
        if _moved(t, slots):
            return True
        return not (t.shape == clone.shape and _same_values(t, clone))  # NaN as NaN

    def _new(self) -> dict[str, tuple[Any, Any, str, set | None]]:
        r"""The places that held no tensor when the call began and hold something now:
        `(value, table, key, the module's non-persistent names or None)` by name."""

        found: dict[str, tuple[Any, Any, str, set | None]] = {}
        for name, d, attr in self.st.empty:
            value = d.get(attr)
            if value is not None:
                found[name] = (value, d, attr, None)
        for name, d, attr, nonpersistent in self.st.added():
            found[name] = (d[attr], d, attr, nonpersistent)
        return found

    def _clear_new(self) -> None:
        r"""Empties the places that held no tensor when the call began: a buffer
        registered as None holds None again, one registered by `fn` is removed."""

        for _, d, attr in self.st.empty:
            if d.get(attr) is not None:  # (not where fn removed it: a parameter now, say)
                d[attr] = None
        for _, d, attr, nonpersistent in self.st.added():
            del d[attr]
            nonpersistent.discard(attr)

    def restore(self) -> None:
        r"""Puts every buffer back as the call found it."""

        with torch.no_grad():
            for t, clone in self.given:
                if not torch.equal(t, clone):
                    t.copy_(clone)
        self._restore_own()
        self._clear_new()

    def _restore_own(self) -> None:
        with torch.no_grad():
            for _, t, clone, slots in self.entries:
                if not self._changed(t, clone, slots):
                    continue
                for d, attr in slots:
                    d[attr] = t
                t.copy_(clone)

    def written(self, skip: Mapping[str, object]) -> list[str]:
        r"""Returns the names of the module's own buffers, but those in `skip` and those
        it holds no more (:meth:`reassigned`), whose values changed since the call
        began."""

        moved = self.reassigned()
        return [
            name
            for name, t, clone, slots in self.entries
            if name not in skip and name not in moved and self._changed(t, clone, slots)
        ]

    def reassigned(self) -> list[str]:
        r"""Returns the names of the module's own buffers that it holds no more in some
        place: `fn` assigned other tensors to them (`self.ema = 0.9 * self.ema + ...`,
        through any of a tied buffer's places); and of the places that held no tensor and
        hold one now (a buffer registered as None and filled, or registered by `fn`)."""

        moved = []
        for name, t, _, slots in self.entries:
            d, attr = slots[0]  # (inlined: once per buffer and call)
            if d.get(attr) is not t or (len(slots) > 1 and _moved(t, slots)):
                moved.append(name)
        new = self._new()
        return moved + list(new) if new else moved

    def write_assigned(self, names: list[str]) -> None:
        r"""Writes what `fn` assigned to the module's own buffers `names` in one sample's
        call into them, as the loop's rule does: detached, in place where the shape and
        dtype are the buffer's (which goes back into its places), else as a new buffer.
        Where `fn` assigned through some places of a tied buffer only, those places get
        what it assigned (detached), the others keep the buffer; a place that held no
        tensor keeps what `fn` left there (detached)."""

        wanted = set(names)
        with torch.no_grad():
            # Every value read before any is written (`self.prev = self.cur`).
            found = []
            for name, t, _, slots in self.entries:
                if name in wanted:
                    held = [_held(d, attr) for d, attr in slots]
                    tied = all(v is held[0] for v in held)
                    copies = [None if v is None or v is t else v.detach().clone() for v in held]
                    found.append((t, slots, copies, tied))
            new = [(v, d, attr) for k, (v, d, attr, _) in self._new().items() if k in wanted]
            for t, slots, copies, tied in found:
                if not tied:  # the places it left alone keep the buffer
                    for (d, attr), value in zip(slots, copies, strict=True):
                        if value is not None:
                            d[attr] = value
                    continue
                value = copies[0]
                if value is None:
                    continue  # removed (`del self.buf`), as a plain forward leaves it
                if value.shape == t.shape and value.dtype == t.dtype:
                    value = t.copy_(value)
                for d, attr in slots:
                    d[attr] = value
            for value, d, attr in new:
                if isinstance(value, Tensor):
                    d[attr] = value.detach().clone()

    def fresh(self) -> dict[str, Tensor]:
        r"""Returns copies of the initial buffers for one sample of a loop to update.

        Autograd may save a buffer for the backward pass (batch norm saves its running
        statistics), so a sample never updates a tensor another sample uses.
        """

        self._fresh = {
            name: clone.clone() for name, t, clone, _ in self.entries if t.dtype != torch.bool
        }
        return self._fresh

    def current(self) -> dict[Any, Any]:
        r"""Returns what the module holds now in the places of its buffers, by name: the
        buffer, or per place where a sample assigned through some of a tied buffer's
        places only (a tuple); and the places that held no tensor and hold one now."""

        held: dict[Any, Any] = {}
        for name, _, _, slots in self.entries:
            d, attr = slots[0]
            value = d.get(attr)  # (the first place is always a table)
            if len(slots) > 1:
                others = [_held(d, attr) for d, attr in slots]
                if any(v is not value for v in others):
                    value = tuple(others)
            held[name] = value
        new = self._new()
        if new:
            held[_NEW] = new
        return held

    def collect(self, held: dict[Any, Any]) -> None:
        r"""Records what one sample of a loop left in the buffers (`held`, from
        :meth:`current`), and puts back any buffer it updated in place."""

        i = self.samples
        for name, t, clone, _ in self.entries:
            value = held[name]
            if type(value) is tuple:
                stand_in = self._fresh.get(name, t)
                self.split.setdefault(name, {})[i] = {
                    j: v.detach().clone()
                    for j, v in enumerate(value)
                    if v is not stand_in and v is not None
                }
                value = stand_in  # what the places it left alone hold
            if value is None:
                continue  # removed: put back
            if value.shape == clone.shape and torch.equal(value, clone):
                continue
            record = value.detach().clone() if value is t else value.detach()
            self.records.setdefault(name, {})[i] = record
        for name, (value, d, attr, nonpersistent) in held.get(_NEW, {}).items():
            if isinstance(value, Tensor):
                value = value.detach().clone()
            self.filled.setdefault(name, {})[i] = value
            if name not in self.places:
                persistent = nonpersistent is None or attr not in nonpersistent
                self.places[name] = (d, attr, nonpersistent, persistent)
        self.samples += 1
        self._restore_own()
        self._clear_new()

    def finish(self) -> None:
        r"""Writes the update rule's result over the samples of a loop into the buffers."""

        with torch.no_grad():
            for name, t, clone, slots in self.entries:
                records = self.records.get(name) or {}
                split = self.split.get(name)
                if split:
                    self._finish_split(t, clone, slots, records, split)
                    continue
                if not records:
                    continue
                values = [records.get(i, clone) for i in range(self.samples)]
                first = values[0]
                if first.shape != t.shape or first.dtype != t.dtype:
                    for d, attr in slots:
                        d[attr] = first
                elif t.is_floating_point() or t.is_complex():
                    t.copy_(torch.stack(values).mean(0))
                else:
                    t.copy_(first)
            for name, filled in self.filled.items():
                values = [filled.get(i) for i in range(self.samples)]
                if all(isinstance(v, Tensor) for v in values):
                    value = _rule(values)
                else:
                    value = values[0]  # the first sample's, as it left it
                if value is None:
                    continue
                d, attr, nonpersistent, persistent = self.places[name]
                d[attr] = value
                if nonpersistent is not None and not persistent:
                    nonpersistent.add(attr)

    def _finish_split(
        self,
        t: Tensor,
        clone: Tensor,
        slots: list[Slot],
        records: dict[int, Tensor],
        split: dict[int, dict[int, Tensor]],
    ) -> None:
        r"""The rule for a tied buffer that some sample assigned through some of its places
        only: each place it assigned gets the rule's value over what the samples left
        there, a tensor of its own; the places none assigned keep the buffer, updated in
        place by the rule over the samples' values of it."""

        n = self.samples
        shared = [records.get(i, clone) for i in range(n)]
        moved = {j for places in split.values() for j in places}
        if len(moved) < len(slots) and records:
            first = shared[0]
            if first.shape == t.shape and first.dtype == t.dtype:
                floating = t.is_floating_point() or t.is_complex()
                t.copy_(torch.stack(shared).mean(0) if floating else first)
        for j in sorted(moved):
            d, attr = slots[j]
            d[attr] = _rule([split.get(i, {}).get(j, shared[i]) for i in range(n)])

    def given_held(self, given: Mapping[str, Tensor]) -> dict[str, Tensor]:
        r"""Returns the tensors that hold the given buffers' places now, by name, where
        they are not `given`'s: `fn` assigned others to them (through any of the places of
        a tied buffer: the first place that holds another)."""

        slots = self.st.buffer_slots
        held = {}
        for name, t in given.items():
            for d, attr in slots[name]:
                value = _held(d, attr)
                if value is not t:
                    held[name] = value
                    break
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
