"""WeightArena: the one mapping that holds re-encoded weights (weights/arena.py), and where the demo model's
re-encoded Q5_0 weights end up."""

from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qwen_engine.config import ModelConfig
from qwen_engine.models.quant import OwnType, QuantLinear
from qwen_engine.weights import arena, quantized
from qwen_engine.weights.arena import ALIGN, HUGE_PAGE, WeightArena
from qwen_engine.weights.gguf import GGUFFile


def test_holds_copies_on_their_own_pages_from_a_huge_page_boundary():
    first = torch.arange(10_000, dtype=torch.int32).view(torch.uint8).view(100, 400)
    second = torch.full((3, 5), 7, dtype=torch.uint8)
    arena = WeightArena(WeightArena.size_for_bytes(first.numel()) + WeightArena.size_for_bytes(second.numel()))
    a, b = arena.hold(first), arena.hold(second)
    assert a.shape == first.shape and b.shape == second.shape
    assert torch.equal(a, first) and torch.equal(b, second)
    assert a.data_ptr() % HUGE_PAGE == 0
    assert b.data_ptr() - a.data_ptr() == WeightArena.size_for_bytes(first.numel()) == 40_960
    first.zero_()  # a copy, not a view of the source
    assert a.view(torch.int32).flatten()[-1] == 9_999
    del arena
    gc.collect()  # the views keep the mapping alive
    assert int(a.view(torch.int32).sum()) == sum(range(10_000)) and int(b.sum()) == 7 * 15


def test_refuses_more_than_it_was_sized_for():
    arena = WeightArena(ALIGN)
    arena.hold(torch.zeros(ALIGN, dtype=torch.uint8))
    with pytest.raises(ValueError, match="arena full"):
        arena.hold(torch.zeros(1, dtype=torch.uint8))


def test_recoded_weights_of_the_demo_model_share_one_arena(demo_llm, demo_gguf):
    if not quantized.recode(torch.nn.Linear(896, 1), Q.Q5_0, 896):
        pytest.skip("this build keeps Q5_0 weights as the file's blocks (no re-encoding here)")
    layers = demo_llm.model.model.layers
    recoded = [b for layer in layers for b in layer.mlp.gate_up_proj.blocks]  # gate and up are Q5_0 in the file
    assert len(recoded) == 48
    # Rows of 896 values (7 x 128) take the fields layout (unless QWEN_ENGINE_RECODE_Q5_0 asks for Q8_0).
    expected = OwnType.Q5_0_FIELDS if os.environ.get("QWEN_ENGINE_RECODE_Q5_0") != "q8_0" else Q.Q8_0
    assert {t for layer in layers for t in layer.mlp.gate_up_proj.qtypes} == {expected}
    # Arena slots start on pages of their own (a separately allocated tensor starts just past malloc's header),
    # and the 48 weights lie within one span no longer than all re-encoded weights together.
    assert all(b.data_ptr() % ALIGN == 0 for b in recoded)
    starts = sorted(b.data_ptr() for b in recoded)
    total = sum(WeightArena.size_for_bytes(p.numel()) for m in demo_llm.model.modules()
                if isinstance(m, QuantLinear) for p in m.blocks if p.data_ptr() % ALIGN == 0)
    assert starts[-1] + recoded[0].numel() - starts[0] <= total


def huge_pages_of(address: int) -> int:
    """kB of transparent huge pages in this process's mapping that holds `address` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                inside = lo <= address < hi
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1])
    raise AssertionError("address not mapped")


def thp_mode() -> str:
    """This system's transparent huge page mode; skips the test where there are none."""
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are switched off on this system")
    return mode


def test_huge_pages_when_asked_and_not_when_refused(monkeypatch):
    mode = thp_mode()
    data = torch.ones(6 << 20, dtype=torch.uint8)
    monkeypatch.setenv("QWEN_ENGINE_HUGE_PAGES", "0")
    plain = WeightArena(data.numel()).hold(data)
    monkeypatch.setenv("QWEN_ENGINE_HUGE_PAGES", "1")
    huge = WeightArena(data.numel()).hold(data)
    if "[always]" not in mode:
        assert huge_pages_of(plain.data_ptr()) == 0
    assert huge_pages_of(huge.data_ptr()) >= 2048  # at least one 2 MiB page of the 6 MiB
    assert torch.equal(huge, data) and torch.equal(plain, data)


def test_huge_pages_are_faulted_in_before_the_weights_are_written(monkeypatch):
    """An arena in huge pages has its pages touched at once (fault_in, from every core): they are there before a
    byte is written (and hold zeros); without fault_in, none is."""
    thp_mode()
    real, touched = arena.fault_in, []
    monkeypatch.setattr(arena, "fault_in", lambda address, size: (touched.append(size), real(address, size)))
    held = WeightArena(6 << 20, huge_pages=True).take((6 << 20,))
    assert touched == [6 << 20]
    assert huge_pages_of(held.data_ptr()) >= 2048  # at least one 2 MiB page of the 6 MiB
    assert int(held.count_nonzero()) == 0
    assert WeightArena(6 << 20, huge_pages=False) and touched == [6 << 20]  # small pages: left to the copies
    assert resident_bytes(held.data_ptr(), 6 << 20) >= 2 << 20  # a whole 2 MiB page, from a one-byte touch
    monkeypatch.setattr(arena, "fault_in", lambda address, size: None)
    untouched = WeightArena(6 << 20, huge_pages=True).take((6 << 20,))
    # (mincore, not smaps: the kernel may merge the two arenas' mappings into one entry there)
    assert resident_bytes(untouched.data_ptr(), 6 << 20) == 0


def resident_bytes(address: int, size: int) -> int:
    """Bytes of [address, address + size) (whole 4 KiB pages) in memory now, by mincore(2)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = address // page * page, -(-(address + size) // page) * page
    flags = (ctypes.c_ubyte * ((end - start) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), flags) == 0, ctypes.get_errno()
    return sum(f & 1 for f in flags) * page


def test_huge_pages_by_default_only_where_free_blocks_back_them(monkeypatch):
    monkeypatch.delenv("QWEN_ENGINE_HUGE_PAGES", raising=False)
    monkeypatch.setattr(arena, "free_huge_pages", lambda: 100)
    assert arena.huge_pages_wanted(40 * HUGE_PAGE)  # 41 pages, with as many to spare
    assert not arena.huge_pages_wanted(60 * HUGE_PAGE)
    monkeypatch.setenv("QWEN_ENGINE_HUGE_PAGES", "1")
    assert arena.huge_pages_wanted(60 * HUGE_PAGE)
    monkeypatch.setenv("QWEN_ENGINE_HUGE_PAGES", "0")
    assert not arena.huge_pages_wanted(HUGE_PAGE)


def test_free_huge_pages_reads_this_systems_buddy_lists():
    pages = arena.free_huge_pages()
    assert pages >= 0
    if pages and os.path.exists("/proc/buddyinfo"):  # 2 MiB blocks are free memory: never more than there is
        assert pages * HUGE_PAGE <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize("replaced", [False, True])
def test_in_huge_pages_the_files_streamed_weights_are_copied_too(demo_gguf, monkeypatch, replaced):
    """With huge pages, the file's own blocks a decode step streams (the tied embedding / LM head, the Q4_K
    projections) are copied into the arena — byte for byte — unless the caller is about to replace the layers
    (w8a8), which then also stay in the file's own block types."""
    monkeypatch.setenv("QWEN_ENGINE_HUGE_PAGES", "1")
    gguf = GGUFFile(demo_gguf)
    tied = [n for n in gguf.tensor_names() if n != "output.weight"]  # read as if the file had no output tensor
    config = ModelConfig.from_gguf(gguf.metadata, int(gguf.tensors["token_embd.weight"].shape[1]), tied)
    model = quantized.build_quantized(config, gguf, demo_gguf, layers_replaced=replaced)
    copy = not replaced
    head = model.lm_head.blocks[0]
    assert head.data_ptr() == model.model.embed_tokens.blocks.data_ptr()  # still one tensor for both
    mapping = gguf.raw("token_embd.weight").base  # the file's whole memory map
    start = mapping.ctypes.data

    def in_file(t: torch.Tensor) -> bool:
        return start <= t.data_ptr() < start + mapping.nbytes

    file_head = torch.from_numpy(gguf.raw("token_embd.weight"))
    assert in_file(head) != copy
    assert torch.equal(head[:7], file_head[:7]) and torch.equal(head[-3:], file_head[-3:])
    down = model.model.layers[2].mlp.down_proj  # Q4_K in the file (half the layers' are Q6_K)
    assert down.qtypes == [Q.Q4_K]
    assert in_file(down.blocks[0]) != copy
    assert torch.equal(down.blocks[0], torch.from_numpy(gguf.raw("blk.2.ffn_down.weight")))
    if replaced:
        assert model.model.layers[0].mlp.gate_up_proj.qtypes == [Q.Q5_0, Q.Q5_0]  # not re-laid either
