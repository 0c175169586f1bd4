"""Slots carved on demand from one buffer, each the size of the chunk it carries.

The pipeline's budget buys ``Layout.slots`` slots of the largest chunk. A merge with
statistics passes has two, so that a tensor in one chunk is read once; but then the
reader can be at most one tensor ahead, and a small tensor (an attention projection, a
norm) takes a whole slot while a large one computes. ``SlotArena`` hands out the same
bytes per chunk instead: a slot is as large as its item needs (its rows and output
buffers, page-aligned, O_DIRECT's slack included), so several small tensors fit where one
large one did, and the reader reads further ahead. Slots come back in any order (the
compute stage returns a statistics pass's slot, the writer a written one) and their
bytes are free at once; a new slot takes the lowest free range that holds it (first fit,
so a small model touches only the low pages). An item never needs more than a fixed
slot, and the arena holds ``Layout.slots`` of those, so the reader gets its slot at the
latest once every slot before it is back: nothing it waits for waits for the reader.

(2 GB trio, ``--memory 256MiB``, two slots of the same chunk against four in twice the
memory: nuslerp 9.9 -> 8.7 s, sce 15.5 -> 12.0, arcee_fusion 13.2 -> 11.0, multislerp
16.0 -> 13.7: the depth the arena gives within the budget.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from streammerge.exec.layout import Item, Layout, Slot
from streammerge.io.ranges import DIRECT_SLACK, align_up
from streammerge.io.reader import DTYPE_ITEMSIZE


@dataclass(eq=False)
class _Carved:
    """One slot's bytes in the arena: [offset, offset + size)."""

    offset: int
    size: int


class SlotArena:
    """Slots carved from one page-aligned buffer (``Layout.slots`` fixed slots' bytes).

    Args:
        layout: the run's buffer sizes (rows, the widest input and output itemsizes per
            chunk element, ``outputs`` output buffers per slot).
        alloc: ``alloc(shape) -> uint8 array`` on page-aligned memory (the backend's).
        outputs: output buffers per slot (a sweep's K; at least 1).
    """

    def __init__(self, layout: Layout, alloc, outputs: int) -> None:
        self.layout, self.outputs = layout, max(1, outputs)
        #: bytes of one fixed slot: the most an item may need
        self.slot_size = layout.rows * layout.row_bytes + self.outputs * layout.out_row_bytes
        self.total = layout.slots * self.slot_size
        self.buffer = alloc((self.total,))
        self._live: list[_Carved] = []
        self._cond = threading.Condition()

    def sizes(self, item: Item) -> tuple[int, int]:
        """(bytes per input row, bytes per output buffer) of ``item``'s slot, each a
        multiple of DIRECT_ALIGN with O_DIRECT's slack: a copy reads into the output
        buffer only; any other pass reads rows of the layout's widest input itemsize."""
        lay, n = self.layout, item.chunk.count
        per_in = lay.cap_in_bytes // max(1, lay.chunk_elems)
        per_out = lay.cap_out_bytes // max(1, lay.chunk_elems)
        if item.op == "copy":
            return align_up(DIRECT_SLACK), align_up(n * item.tensor.base.itemsize + DIRECT_SLACK)
        out = max(n * per_out, n * DTYPE_ITEMSIZE[item.tensor.dtype])
        return align_up(n * per_in + DIRECT_SLACK), align_up(out + DIRECT_SLACK)

    def take(self, item: Item, timeout: float) -> Slot | None:
        """A slot for ``item``, waiting up to ``timeout`` seconds for room; None: not yet
        (the caller checks whether the run stopped, and asks again).

        Raises:
            ValueError: the item needs more than a fixed slot (a planning error).
        """
        row, out = self.sizes(item)
        size = self.layout.rows * row + self.outputs * out
        if size > self.slot_size:
            raise ValueError(f"{item.tensor.name}: a chunk of {item.chunk.count} elements "
                             "needs more than a slot")  # fmt: skip
        with self._cond:
            offset = self._fit(size)
            if offset is None:
                self._cond.wait(timeout)
                offset = self._fit(size)
            if offset is None:
                return None
            carved = _Carved(offset, size)
            self._live.append(carved)
        return self._slot(carved, row, out)

    def give(self, slot: Slot) -> None:
        """Return ``slot``: its bytes are free at once."""
        with self._cond:
            self._live.remove(slot.carved)
            self._cond.notify_all()

    def _fit(self, size: int) -> int | None:
        """The lowest offset where ``size`` bytes are free (first fit: a small model
        touches only the low pages); None: not yet."""
        end = 0
        for c in sorted(self._live, key=lambda c: c.offset):
            if c.offset - end >= size:
                return end
            end = max(end, c.offset + c.size)
        return end if self.total - end >= size else None

    def _slot(self, carved: _Carved, row: int, out: int) -> Slot:
        rows = self.layout.rows
        base = carved.offset
        inputs = self.buffer[base : base + rows * row].reshape(rows, row)
        base += rows * row
        outs = [self.buffer[base + k * out : base + (k + 1) * out] for k in range(self.outputs)]
        return Slot(inputs, outs[0], outs=outs, carved=carved)
