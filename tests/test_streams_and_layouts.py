"""The pieces of layout-independent data and elastic layouts, without Ray: the canonical streams
cover every row of the run once, a step's rows are the same on every layout, and the layouts a
run may take (and the one a cluster's nodes hold) follow the rules the README gives. The whole
path on a real multi-node Ray: tests/test_node_loss.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from saescale.distributed.layouts import Layout, best_fitting, candidate_layouts
from saescale.service.capacity import NodeLost, choose_layout, worker_slots
from saescale.service.stream import owned_streams, plan_data


def plan(rows: list[int], streams: int, batch: int = 64, epochs: int = 3):
    files = [f"shard{i}" for i in range(len(rows))]
    return plan_data(files, rows, batch, streams, epochs, seed=7, sha256=["x"] * len(rows), sizes=[1] * len(rows))


@pytest.mark.parametrize("streams", [1, 2, 3, 4, 8])
def test_the_streams_cover_every_row_of_every_epoch_once_and_move_through_the_epochs_together(streams):
    rows = [1000, 1000, 1000, 537, 1000]
    epochs = 3
    data = plan(rows, streams, batch=48 * streams, epochs=epochs)
    seen: Counter[tuple[int, str, int]] = Counter()
    sequences = []  # per stream: the epoch of each row it gives, in order
    for stream in range(streams):
        reads = data.stream_reads(stream)
        assert len(reads) == epochs  # one read per epoch, its files distinct
        sequence = []
        for epoch, read in enumerate(reads):
            assert len({p.path for p in read}) == len(read)
            for p in read:
                assert 0 <= p.start < p.stop <= rows[int(p.path.removeprefix("shard"))]
                seen.update((epoch, p.path, r) for r in range(p.start, p.stop))
                sequence += [epoch] * (p.stop - p.start)
        sequences.append(sequence)
    assert max(seen.values()) == 1  # no row twice in an epoch
    assert len(seen) == epochs * (sum(rows) - sum(rows) % streams)  # fewer than `streams` rows out per epoch
    assert all(seq == sequences[0] for seq in sequences)  # equal parts: every step's rows share epochs
    assert data.total_steps == len(sequences[0]) // data.stream_batch


def test_every_layout_reads_the_same_streams_in_the_same_order_each_step():
    streams = 4
    for world in (1, 2, 4):
        owned = [list(owned_streams(streams, world, rank)) for rank in range(world)]
        assert [s for share in owned for s in share] == list(range(streams))  # gathered in rank order
    with pytest.raises(ValueError, match="must divide"):
        owned_streams(4, 3, 0)


def test_a_stream_count_that_the_batch_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="divisible by data.streams=3"):
        plan([1000, 1000], streams=3, batch=64)


def test_candidate_layouts_divide_the_streams_and_keep_tp_a_divisor():
    assert candidate_layouts(streams=4, max_workers=4, tp=2) == [Layout(4, 2), Layout(2, 2), Layout(1, 1)]
    assert candidate_layouts(streams=6, max_workers=6, tp=2, min_workers=2) == [
        Layout(6, 2),
        Layout(3, 1),
        Layout(2, 2),
    ]
    assert best_fitting(candidate_layouts(4, 4, 2), slots=3) == Layout(2, 2)
    assert best_fitting(candidate_layouts(4, 4, 2, min_workers=2), slots=1) is None


def test_worker_slots_leave_a_cpu_for_the_reads_and_count_whole_workers_per_node():
    assert worker_slots([{"CPU": 2.0}, {"CPU": 2.0}], 1.0, False, 1.0) == 3
    assert worker_slots([{"CPU": 0.0}, {"CPU": 2.0}], 1.0, False, 1.0) == 1  # a head without CPUs
    assert worker_slots([{"CPU": 3.0}, {"CPU": 3.0}], 2.0, False, 1.0) == 2  # 1.5 per node rounds down
    assert worker_slots([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0}], 4.0, True, 1.0) == 2  # GPUs bound it
    # data.source=model: each worker's LM actors take CPUs too (2 + 2 of 1 CPU each: 1 worker per node)
    assert worker_slots([{"CPU": 3.0}, {"CPU": 3.0}], 1.0, False, 0.0, data_cpus_per_worker=2.0) == 2
    assert worker_slots([{"CPU": 3.0}, {"CPU": 2.0}], 1.0, False, 0.0, data_cpus_per_worker=2.0) == 1


class Slots:
    """A stand-in for `capacity.CapacityCheck`: a fixed count of worker places (the real count
    comes from Ray's nodes, exercised in tests/test_node_loss.py)."""

    def __init__(self, slots: int) -> None:
        self.count = slots

    def slots(self, probe: bool = False) -> int:
        return self.count

    def describe(self, workers: int) -> str:
        return f"{workers} workers of 1 CPU"


def test_choose_layout_shrinks_only_when_elastic_and_names_the_layout_that_fits():
    layouts = [Layout(4, 2), Layout(2, 2), Layout(1, 1)]
    assert choose_layout(layouts, elastic=True, check=Slots(3), wait_s=0, first_start=False) == Layout(2, 2)
    assert choose_layout(layouts, elastic=False, check=Slots(4), wait_s=0, first_start=False) == Layout(4, 2)
    with pytest.raises(NodeLost) as lost:
        choose_layout(layouts, elastic=False, check=Slots(3), wait_s=0, first_start=False)
    assert lost.value.fitting == Layout(2, 2) and "hold 3 such worker(s)" in str(lost.value)
    with pytest.raises(NodeLost) as lost:
        choose_layout(layouts[:2], elastic=True, check=Slots(1), wait_s=0, first_start=False)
    assert lost.value.fitting is None


def stream_rows(data, stream: int, start_row: int = 0, stop_row: int | None = None) -> list[tuple[str, int]]:
    return [
        (p.path, r)
        for read in data.stream_reads(stream, start_row, stop_row)
        for p in read
        for r in range(p.start, p.stop)
    ]


@pytest.mark.parametrize("start_row,stop_row", [(0, None), (0, 700), (1, 5), (999, 3001), (2345, None), (4140, 4144)])
def test_a_stream_read_from_any_row_is_the_same_rows_as_the_whole_stream_sliced(start_row, stop_row):
    """A restart builds its streams from the block holding its step: those rows must be exactly
    the whole stream's from that row on (epochs crossed, the first shard entered mid-way)."""
    data = plan([1000, 1000, 1000, 537, 1000], streams=2, batch=96, epochs=3)
    for stream in range(2):
        whole = stream_rows(data, stream)
        assert stream_rows(data, stream, start_row, stop_row) == whole[start_row:stop_row]


def test_stream_steps_permute_each_block_by_its_seed_and_cut_it_into_steps():
    """The shuffle buffer as blocks (`data.blocks`): a block's rows permuted by (seed, stream,
    block), whatever block the stream starts at, so a resumed stream gives the same steps."""
    from saescale.data.blocks import block_permutation, block_steps, resume_block
    from saescale.service.stream import stream_steps

    stream_batch, per_block = 4, block_steps(4, 10)  # 3 steps (12 rows) a block
    rows = torch.arange(40.0)[:, None]
    blocks = [rows[i : i + 12] for i in range(0, 40, 12)]  # the last block is short: 4 rows
    steps = list(stream_steps(blocks, 7, 1, 0, True, stream_batch))
    assert len(steps) == 10 and all(s.shape == (4, 1) for s in steps)
    assert torch.equal(torch.cat(steps[:3]).flatten(), torch.from_numpy(block_permutation(7, 1, 0, 12)).float())
    assert sorted(torch.cat(steps).flatten().tolist()) == list(range(40))  # every row once
    first, skip = resume_block(7, per_block)  # resume at step 7: block 2, one step in
    assert (first, skip) == (2, 1)
    resumed = list(stream_steps(blocks[first:], 7, 1, first, True, stream_batch))[skip:]
    assert all(torch.equal(a, b) for a, b in zip(resumed, steps[7:], strict=True))
    ids = list(stream_steps([(rows[:12], torch.arange(12))], 7, 1, 0, True, stream_batch))  # ids follow their rows
    assert all(torch.equal(acts.flatten().long(), i) for acts, i in ids)
    assert torch.equal(torch.cat(list(stream_steps(blocks, 7, 1, 0, False, stream_batch))), rows)  # buffer 0


def test_a_resume_whose_stream_order_differs_is_refused_in_one_line():
    """The data position is the step only for the same streams, batch, seed and shuffle blocks;
    a cache run's checkpoint from before the blocks (a sliding shuffle buffer) is refused too."""
    from saescale.service.ray_train import check_data_position

    data = plan([1000] * 4, streams=2, batch=64)
    saved = {"streams": 2, "stream_batch": 32, "seed": 7, "world": 2, "block_steps": 4}
    check_data_position(saved, data, 7, 4, cached=True)  # the same: resumes
    check_data_position({}, data, 7, 4, cached=True)  # no position: a fresh start
    with pytest.raises(ValueError, match="blocks of 4 steps; this run's are 8 steps.*data.shuffle_buffer_rows"):
        check_data_position(saved, data, 7, 8, cached=True)
    old = {k: v for k, v in saved.items() if k != "block_steps"}
    with pytest.raises(ValueError, match="before the cache's streams were shuffled in blocks.*start a new run"):
        check_data_position(old, data, 7, 4, cached=True)
    check_data_position(old, data, 7, 4, cached=False)  # the model stream had blocks all along
    with pytest.raises(ValueError, match="data.streams=2, global batch 64 and seed 7; this run's has 2, 64 and 8"):
        check_data_position(saved, data, 8, 4, cached=True)


def test_reading_shards_needs_no_torch():
    """Ray Data runs the shard reads (`read_piece`, pyarrow tables) in worker processes of their
    own; importing torch there would cost each of them ~1.2 s of CPU for nothing. What a read
    task unpickles must not import it (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import saescale.service.stream, saescale.storage, saescale.console, saescale.data.format\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
