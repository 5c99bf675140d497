"""One shard's (rank, worker's) endless read of its units: passes, groups of units read side by
side, shuffle windows, and the cursor that says exactly where it stands.
"""
import collections
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ldm.data.records import SkipCounter, format_skips, log
from ldm.data.filelists import FileListEntry, Unit, iter_unit_lines, make_units, shard_units
from ldm.data.storage import prefetch_parts


# Default of --parts_per_window: units read side by side into each shuffle window.
PARTS_PER_WINDOW = 4
# A filelist is barren for a shard once this many of its units (or all, if it has fewer) were
# read in whole passes without one usable record. Passes reshuffle the units, so one bad part
# (say, a shard's only unit of a small dataset) never stops a run; 32 bad in a row is no luck.
BARREN_UNITS = 32


# ---------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------


@dataclass
class RawRecord:
    part: str
    line: int
    raw: bytes
    pass_index: int
    list_index: int


# A shard's position in one filelist: (pass, group of units in the pass, window of the group,
# records of the window already yielded). Four integers, so it travels with every sample and
# a checkpoint can store exactly where each worker's stream stood.
CURSOR_FIELDS = 4
# The pass field of a shard still finishing old shards' passes after a layout change (ShardStream.tail_stream).
TAIL_PASS = -1


def group_windows(units: Sequence[Unit], window: int, skips: SkipCounter, first_window: int = 0) -> Iterator[List[Tuple[str, int, bytes]]]:
    """Windows of (part, line number, raw line) read from a group of units side by side.

    Window w holds lines [w*c, (w+1)*c) of each unit, c = ceil(window / len(units)); a unit
    that has run out adds nothing, and the group ends when all have. Lines of windows before
    `first_window` are read past without being kept (how a resumed stream catches up)."""
    chunk = max(1, math.ceil(window / len(units)))
    readers = []
    for unit in units:
        lines = iter_unit_lines(unit, skips, catch_up=first_window * chunk)
        collections.deque(itertools.islice(lines, first_window * chunk), maxlen=0)
        readers.append((unit.part, lines))
    while True:
        batch = [(part, line_no, raw) for part, lines in readers for line_no, raw in itertools.islice(lines, chunk)]
        if not batch:
            return
        yield batch


class ShardStream:
    """The endless record stream of one shard (one rank's one dataloader worker).

    Shuffling is by window: a group of `parts_per_window` units is read side by side, `window`
    lines at a time, and each window is permuted before it is yielded, so the stream's position
    is four small integers per filelist (see CURSOR_FIELDS) and resuming re-reads at most one
    window per filelist. `passes` (default: endless) stops each filelist after that many passes.

    The consumer calls `used(list_index)` for each record it could use; a filelist whose passes
    yield none is then marked barren (see BARREN_UNITS), and `barren` holding every filelist
    means the shard can never yield a usable record.
    """

    def __init__(self, entries: List[FileListEntry], shard: int, num_shards: int, seed: int, window: int, state: Optional[np.ndarray] = None,
                 parts_per_window: int = PARTS_PER_WINDOW, passes: Optional[int] = None, tail: Optional[dict] = None):
        self.entries = entries
        # After a layout change (TextImageStream.resume): the old shards whose interrupted passes this
        # shard finishes first, {"old_shards": S, "max_pass": [per filelist], "tasks": [[old shard, position], ...]}.
        self.tail = tail
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.window = max(1, window)
        self.parts_per_window = max(1, parts_per_window)
        self.passes = passes
        self.skips = SkipCounter()
        self.barren = set()  # filelists without a usable record for this shard (see BARREN_UNITS)
        self._used = [False] * len(entries)  # a record of the filelist's current pass was usable
        self._idle = [set() for _ in entries]  # units read in whole passes since the filelist's last usable record
        self.units = [make_units(e.parts, num_shards) for e in entries]
        weights = np.array([e.weight for e in entries], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        # state = [draws, cursor of filelist 0, cursor of filelist 1, ...]
        self.state = np.zeros(1 + CURSOR_FIELDS * len(entries), dtype="int64") if state is None else np.array(state, dtype="int64")
        if self.state.shape != (1 + CURSOR_FIELDS * len(entries),):
            raise ValueError(f"saved data position has {self.state.size} numbers, expected {1 + CURSOR_FIELDS * len(entries)}: the --file_list changed since the checkpoint")

    def cursor(self, list_index: int) -> np.ndarray:
        return self.state[1 + CURSOR_FIELDS * list_index : 1 + CURSOR_FIELDS * (list_index + 1)]

    def used(self, list_index: int) -> None:
        """The consumer could use a record of this filelist (called before it asks for the next)."""
        self._used[list_index] = True

    def _end_pass(self, list_index: int, units: List[Unit], whole: bool) -> None:
        """Barren bookkeeping at the end of a pass (`whole`: read from its start)."""
        idle = self._idle[list_index]
        if self._used[list_index]:
            idle.clear()
            self.barren.discard(list_index)
        elif whole:
            idle.update(units)
            if len(idle) >= min(BARREN_UNITS, len(self.units[list_index])) and list_index not in self.barren:
                self.barren.add(list_index)
                if len(self.barren) < len(self.entries):
                    log(f"{self.skips.where}: no usable record in {len(idle)} units of filelist {self.entries[list_index].path} "
                        f"(the other filelists go on); skips so far: {format_skips(self.skips)}")
        self._used[list_index] = False

    def tail_groups(self, list_index: int) -> List[Tuple[int, int, int, List[Unit], int, int]]:
        """The groups of units left to read of the old shards this shard took over at a layout
        change, in order: (pass, old shard, its group index, units, first window, records of that
        window already read). For each old shard: the rest of its pass from its saved cursor, then
        its whole passes up to the highest pass any old shard had reached (so every pass up to that
        one is read exactly once, in the old layout; later passes use the new one)."""
        old_shards = int(self.tail["old_shards"])
        units = make_units(self.entries[list_index].parts, old_shards)
        groups = []
        for old_shard, position in self.tail["tasks"]:
            start = position[1 + CURSOR_FIELDS * list_index : 1 + CURSOR_FIELDS * (list_index + 1)]
            for pass_index in range(int(start[0]), int(self.tail["max_pass"][list_index]) + 1):
                mine = shard_units(units, old_shards, int(old_shard), self.seed, list_index, pass_index)
                first = int(start[1]) if pass_index == start[0] else 0
                for g in range(first, -(-len(mine) // self.parts_per_window)):
                    at_cursor = pass_index == start[0] and g == start[1]
                    groups.append((pass_index, int(old_shard), g, mine[g * self.parts_per_window : (g + 1) * self.parts_per_window],
                                   int(start[2]) if at_cursor else 0, int(start[3]) if at_cursor else 0))
        return groups

    def tail_stream(self, list_index: int) -> Iterator[RawRecord]:
        """The old shards' records left to read (tail_groups), each window shuffled as its old shard
        did, so the records it had yielded are exactly the first ones of its window's order. The
        cursor is (TAIL_PASS, group of tail_groups, window, records of the window yielded); a shard
        that has not entered its tail has group -1."""
        cursor = self.cursor(list_index)
        groups = self.tail_groups(list_index)
        if cursor[1] < 0 and groups:
            cursor[1:] = (0, groups[0][4], groups[0][5])
        for t in range(max(0, int(cursor[1])), len(groups)):
            pass_index, old_shard, g, units, _, _ = groups[t]
            for w, window in enumerate(group_windows(units, self.window, self.skips, int(cursor[2])), start=int(cursor[2])):
                order = np.random.default_rng([self.seed, list_index, pass_index, old_shard, g, w]).permutation(len(window))
                for k in range(int(cursor[3]), len(order)):
                    part, line_no, raw = window[order[k]]
                    cursor[1:] = (t, w, k + 1)
                    yield RawRecord(part, line_no, raw, pass_index, list_index)
                cursor[2:] = (w + 1, 0)
            if t + 1 < len(groups):
                cursor[1:] = (t + 1, groups[t + 1][4], groups[t + 1][5])
        cursor[:] = (int(self.tail["max_pass"][list_index]) + 1, 0, 0, 0)  # the new layout from the next pass on

    def list_stream(self, list_index: int) -> Iterator[RawRecord]:
        """One filelist's endless stream for this shard, starting at its saved cursor."""
        cursor = self.cursor(list_index)  # a view: advancing it advances self.state
        if cursor[0] == TAIL_PASS:
            yield from self.tail_stream(list_index)
        while True:
            pass_index = int(cursor[0])
            units = shard_units(self.units[list_index], self.num_shards, self.shard, self.seed, list_index, pass_index)
            groups = [units[i : i + self.parts_per_window] for i in range(0, len(units), self.parts_per_window)]
            resumed_midway = bool(cursor[1:].any())
            got_any = False
            for g in range(int(cursor[1]), len(groups)):
                if g + 1 < len(groups):
                    prefetch_parts([u.part for u in groups[g + 1]])  # remote parts only: their first blocks arrive meanwhile
                for w, window in enumerate(group_windows(groups[g], self.window, self.skips, int(cursor[2])), start=int(cursor[2])):
                    order = np.random.default_rng([self.seed, list_index, pass_index, self.shard, g, w]).permutation(len(window))
                    for k in range(int(cursor[3]), len(order)):
                        part, line_no, raw = window[order[k]]
                        cursor[:] = (pass_index, g, w, k + 1)
                        got_any = True
                        yield RawRecord(part, line_no, raw, pass_index, list_index)
                    cursor[2:] = (w + 1, 0)
                cursor[1:] = (g + 1, 0, 0)
            self._end_pass(list_index, units, whole=not resumed_midway)
            if self.passes is not None and pass_index + 1 >= self.passes:
                return
            if not got_any and list_index in self.barren:
                return  # no line left to read for this shard: end it, never spin
            cursor[:] = (pass_index + 1, 0, 0, 0)

    def __iter__(self) -> Iterator[RawRecord]:
        """Interleave the filelists' streams, drawing a filelist by weight (draw k is seeded by k)."""
        streams = [self.list_stream(i) for i in range(len(self.entries))]
        ended = set()
        while len(ended) < len(streams):
            i = self._draw(ended)
            try:
                rec = next(streams[i])
            except StopIteration:
                ended.add(i)  # draw again (same k): the walk goes on past it
                continue
            self.state[0] += 1
            yield rec

    def _draw(self, ended: set) -> int:
        """The filelist of draw k = state[0]: the first not-ended one in a weighted order without
        replacement seeded by k (its first pick is today's searchsorted draw). Once filelists have
        ended (a --passes limit, or barren ones), the others keep their mutual ratio, 8:1 stays 8:1:
        the first of the rest in such an order is drawn by their weights alone. A filelist found
        ended only when drawn (a resumed stream learns it late) leaves the pick as it was: the walk
        passes over it whether it was known ended or not, so the draws stay a function of the position."""
        alive = [i for i in range(len(self.entries)) if i not in ended]
        if len(alive) == 1:
            return alive[0]  # nothing to draw (a seeded generator per record costs ~2% of the worker's time)
        rng = np.random.default_rng([self.seed, self.shard, 2, int(self.state[0])])
        candidates = list(range(len(self.entries)))
        cum = self.cum_weights
        while True:
            pick = candidates[min(int(np.searchsorted(cum, rng.random(), side="right")), len(candidates) - 1)]
            if pick not in ended:
                return pick
            candidates.remove(pick)
            weights = np.array([self.entries[c].weight for c in candidates], dtype=np.float64)
            cum = np.cumsum(weights / weights.sum())
