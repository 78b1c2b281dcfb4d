"""Pure-Python units: block manager (ref counts, prefix hashes) and scheduler (budget, preemption)."""

from moe_engine.block_manager import BlockManager
from moe_engine.sampling import SamplingParams
from moe_engine.scheduler import Scheduler
from moe_engine.sequence import Sequence


def seq(i, tokens, max_tokens=8):
    return Sequence(i, list(tokens), SamplingParams(max_tokens=max_tokens), max_len=1000)


def test_allocate_grow_release_counts():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    s = seq(0, range(9))
    assert bm.allocate_prompt(s, 9) and len(s.blocks) == 3 and bm.num_free == 3
    s.num_cached = 9
    assert bm.can_grow(s, 3) and not bm.can_grow(s, 20)
    bm.grow(s, 3)
    assert len(s.blocks) == 3          # 12 tokens still fit in 3 blocks
    bm.grow(s, 4)
    assert len(s.blocks) == 4
    bm.release(s)
    assert bm.num_free == 6 and not any(bm.ref_counts) and s.blocks == []


def test_prefix_blocks_shared_and_revived():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, range(10))
    assert bm.allocate_prompt(a, 10)
    a.num_cached = 10
    bm.register_full_blocks(a)                  # blocks 0 and 1 are full
    b = seq(1, list(range(8)) + [50, 51, 52])
    assert bm.allocate_prompt(b, 11)
    assert b.blocks[:2] == a.blocks[:2] and b.num_cached == 8 and bm.prefix_hits == 2
    assert bm.ref_counts[a.blocks[0]] == 2
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 8
    c = seq(2, list(range(8)) + [7])            # revives the freed but still hashed blocks
    assert bm.allocate_prompt(c, 9) and c.num_cached == 8 and bm.prefix_hits == 4


def test_whole_prompt_cached_still_computes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, range(8))
    bm.allocate_prompt(a, 8)
    a.num_cached = 8
    bm.register_full_blocks(a)
    b = seq(1, range(8))
    bm.allocate_prompt(b, 8)
    assert b.num_cached == 4                    # the last block is recomputed for its logits


def test_reused_block_loses_its_old_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq(0, [1, 2, 3])
    bm.allocate_prompt(a, 3)
    a.num_cached = 3
    bm.register_full_blocks(a)
    bm.release(a)
    b = seq(1, [9, 9, 9, 9])                    # takes both blocks, overwriting a's content
    bm.allocate_prompt(b, 4)
    bm.release(b)
    c = seq(2, [1, 2, 5])
    bm.allocate_prompt(c, 3)
    assert c.num_cached == 0 and bm.prefix_hits == 0


def test_scheduler_budget_chunks_and_caps():
    bm = BlockManager(num_blocks=100, block_size=4)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    for i, n in enumerate([7, 6, 3]):
        sch.add(seq(i, range(100 * i, 100 * i + n)))
    batch = sch.schedule()
    assert batch.num_tokens == [7, 3]            # second prompt chunked to the budget
    assert len(sch.running) == 2 and len(sch.waiting) == 1   # max_num_seqs holds the third back


def test_scheduler_preempts_youngest_when_blocks_run_out():
    bm = BlockManager(num_blocks=5, block_size=2, enable_prefix_caching=False)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, young = seq(0, [1, 2, 3, 4]), seq(1, [5, 6, 7, 8])
    sch.add(old)
    sch.add(young)
    assert sch.schedule().num_tokens == [4, 4]   # 4 of 5 blocks used
    for s in (old, young):
        s.num_cached = 4
        s.output_ids.append(9)                   # each now needs a fifth slot: a new block
    batch = sch.schedule()
    assert batch.seqs == [old] and sch.num_preemptions == 1
    assert young.blocks == [] and young.num_cached == 0 and sch.waiting[0] is young


def test_scheduler_admits_only_what_can_finish_its_prefill():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    first, second = seq(0, range(6)), seq(1, range(10, 16))
    sch.add(first)
    sch.add(second)
    assert sch.schedule().seqs == [first]        # a chunk of 4 uses the whole token budget
    first.num_cached = 4
    # first's last 2 tokens leave budget for second, but second needs 4 blocks (6 tokens + 1) and 3 are free
    assert sch.schedule().seqs == [first] and sch.waiting[0] is second
