"""The kernel bench's table (its numbers come from a GPU; the formatting runs anywhere)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, as the other kernel tests set it

from gptoss_serve.kernels.bench import format_table  # noqa: E402


def test_bench_table_gives_the_share_of_the_copy_to_a_tenth_of_a_percent():
    ceil = dict(copy_gbs=3017.0, bf16_tflops=700.0)
    rows = [dict(op="MoE 20b", shape="64 tok", ms=0.1767, gbs=2401.0, tflops=72.1, torch_ms=28.5,
                 torch_path="moe_experts_ref"),
            dict(op="MoE 20b", shape="8 tok", ms=0.1081, gbs=2449.0)]
    table = format_table(ceil, rows).splitlines()
    assert table[0].startswith("HBM copy bandwidth (read + write): 3017 GB/s")
    assert table[4] == ("| MoE 20b | 64 tok | 176.7 | 2401 | 79.6% | 72.1 | 10% | 28500.0 | moe_experts_ref | "
                        "161.3x |")
    assert "| 81.2% |" in table[5] and table[5].endswith("| — | — |  |")


def test_a_graph_of_layers_takes_the_copies_in_turn_and_times_one_launch(monkeypatch):
    """_bench_layers: num_layers launches in one timed graph over the copies in turn, the time divided by them
    (the timing itself needs a GPU: _bench is replaced by one call of the graph's body, timed 12 ms)."""
    from gptoss_serve.kernels import bench

    def one_call(fn, **_):
        fn()
        return 12.0

    monkeypatch.setattr(bench, "_bench", one_call)
    launched = []
    assert bench._bench_layers(launched.append, ["a", "b", "c", "d"], 6) == 2.0
    assert launched == ["a", "b", "c", "d", "a", "b"]


def test_cold_copies_keep_256_mb_between_two_reads_of_a_copy():
    from gptoss_serve.kernels.bench import NUM_COPIES, cold_copies

    assert cold_copies(67e6, 4) == NUM_COPIES  # never more copies than layers
    assert cold_copies(67e6, 24) == 5  # 4 others' 268 MB between two reads
    assert cold_copies(2.1e6, 24) == 24  # 2 MB layers: every layer its own copy
    assert cold_copies(537e6, 24) == NUM_COPIES  # at least NUM_COPIES
