"""The kernel bench's table (its numbers come from a GPU; the formatting runs anywhere)."""
from gptoss_serve.kernels.bench import format_table


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
