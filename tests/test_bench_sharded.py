"""`gptoss-serve bench sharded --sections collectives` on CPU: two gloo processes time the step message over each
host channel and over the device broadcast it replaced, and report every figure."""

from __future__ import annotations

import json

from gptoss_serve.cluster.shard import bench


def test_collectives_section_reports_each_transport(capsys):
    assert bench.main(["--sections", "collectives"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(printed[printed.index("{"):printed.index("\n}") + 2])
    assert results["device"] == "cpu (gloo)"
    for batch in (1, 64, 256):
        for transport in ("pipe", "gloo"):
            for figure in ("rank 0 send", "arrival on rank 1"):
                value = results[f"step message over {transport}, decode batch {batch}: {figure} (µs)"]
                assert 0 < value < 1e6
        assert 0 < results[f"step message by device broadcast (before), decode batch {batch}: arrival on rank 1 (µs)"]
    assert results["all-reduce gloo 8x2880 fp32 (µs)"] > 0
