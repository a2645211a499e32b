"""The KV-cache block map: a BlockSnapshot rendered as an HTML grid, one cell per block, or per
group of consecutive blocks when there are more blocks than `max_cells`.

    cell colour   free: grey    cached (free, holds a reusable prefix): green
                  in use: the colour of the request holding most of the cell's used blocks
                  held by several requests (a shared prompt prefix): dark

Pure functions of the snapshot (no gradio), so they are tested without a browser. The outer element
carries the counts as data attributes (`data-num-used` ...), which the browser tests read.
"""

from __future__ import annotations

import html
import math
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from hearth.appliance.serving import BlockSnapshot

MAX_CELLS = 1024
FREE_COLOUR = "#e5e7eb"
CACHED_COLOUR = "#86efac"
SHARED_COLOUR = "#334155"
# Distinct, readable on white; a request keeps its colour for as long as it lives (hash of its id).
PALETTE = (
    "#2563eb",
    "#dc2626",
    "#d97706",
    "#7c3aed",
    "#0891b2",
    "#db2777",
    "#65a30d",
    "#ea580c",
    "#4f46e5",
    "#0d9488",
)
SHARED = "(shared)"

CSS = """
.hearth-block-map .grid { display: flex; flex-wrap: wrap; gap: 2px; }
.hearth-block-map .cell { width: 10px; height: 10px; border-radius: 2px; display: inline-block; }
.hearth-block-map .legend { margin-top: 6px; font-size: 12px; line-height: 1.8; }
.hearth-block-map .key { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin: 0 4px 0 10px; vertical-align: middle; }
"""


@dataclass(frozen=True)
class Cell:
    """One grid cell: blocks [first_block, first_block + num_blocks)."""

    first_block: int
    num_blocks: int
    num_used: int
    num_cached: int
    owner: str | None  # request holding most of the used blocks, SHARED, or None when none used

    @property
    def state(self) -> str:
        if self.num_used:
            return "used"
        return "cached" if self.num_cached else "free"


def request_colour(request_id: str) -> str:
    return PALETTE[zlib.crc32(request_id.encode()) % len(PALETTE)]


def block_owners(blocks: BlockSnapshot, seq_requests: Mapping[int, str]) -> list[str | None]:
    """Per block: None (free), the request id holding it, or SHARED when several requests do."""
    owners: list[str | None] = []
    for holders in blocks.block_owner:
        if not holders:
            owners.append(None)
            continue
        requests = {seq_requests.get(seq_id, f"seq {seq_id}") for seq_id in holders}
        owners.append(requests.pop() if len(requests) == 1 else SHARED)
    return owners


def group_cells(
    blocks: BlockSnapshot, seq_requests: Mapping[int, str], max_cells: int = MAX_CELLS
) -> list[Cell]:
    """The grid's cells; `group` consecutive blocks per cell so that there are <= max_cells."""
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    group = max(1, math.ceil(blocks.num_blocks / max_cells))
    owners = block_owners(blocks, seq_requests)
    cells = []
    for first in range(0, blocks.num_blocks, group):
        span = range(first, min(first + group, blocks.num_blocks))
        used = Counter(owners[i] for i in span if owners[i] is not None)
        cells.append(
            Cell(
                first_block=first,
                num_blocks=len(span),
                num_used=sum(used.values()),
                num_cached=sum(1 for i in span if blocks.block_cached[i]),
                owner=used.most_common(1)[0][0] if used else None,
            )
        )
    return cells


def cell_colour(cell: Cell) -> str:
    if cell.owner == SHARED:
        return SHARED_COLOUR
    if cell.owner is not None:
        return request_colour(cell.owner)
    return CACHED_COLOUR if cell.num_cached else FREE_COLOUR


def _cell_title(cell: Cell) -> str:
    last = cell.first_block + cell.num_blocks - 1
    where = f"block {last}" if cell.num_blocks == 1 else f"blocks {cell.first_block}-{last}"
    parts = []
    if cell.num_used:
        parts.append(f"{cell.num_used} in use by {cell.owner}")
    if cell.num_cached:
        parts.append(f"{cell.num_cached} cached")
    num_free = cell.num_blocks - cell.num_used - cell.num_cached
    if num_free:
        parts.append(f"{num_free} free")
    return f"{where}: {', '.join(parts)}"


def render_block_map(
    blocks: BlockSnapshot, seq_requests: Mapping[int, str], max_cells: int = MAX_CELLS
) -> str:
    """The block map as HTML; `seq_requests` maps the scheduler's seq ids to request ids."""
    cells = group_cells(blocks, seq_requests, max_cells)
    group = cells[0].num_blocks if cells else 1
    grid = "".join(
        f'<span class="cell {c.state}" style="background:{cell_colour(c)}" '
        f'title="{html.escape(_cell_title(c))}"></span>'
        for c in cells
    )
    owners = sorted({c.owner for c in cells if c.owner is not None})
    per_cell = "one block" if group == 1 else f"{group} blocks"
    legend = [
        f"{blocks.num_blocks} blocks of {blocks.block_size} tokens, {per_cell} per cell:",
        _key(FREE_COLOUR, f"free ({blocks.num_free - blocks.num_cached})"),
        _key(CACHED_COLOUR, f"cached, reusable ({blocks.num_cached})"),
    ]
    legend += [_key(SHARED_COLOUR if o == SHARED else request_colour(o), o) for o in owners]
    return (
        f'<div class="hearth-block-map" data-num-blocks="{blocks.num_blocks}" '
        f'data-num-used="{blocks.num_used}" data-num-cached="{blocks.num_cached}">'
        f'<div class="grid">{grid}</div><div class="legend">{"".join(legend)}</div></div>'
    )


def _key(colour: str, label: str) -> str:
    return f'<span class="key" style="background:{colour}"></span>{html.escape(label)}'
