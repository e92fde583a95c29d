"""Decode and prefill MoE (serving layout) and decode attention outputs on fixed random inputs, saved so that two
trees can be compared bit for bit in one device call, with their times (CUDA-graph replays over 4 layers' weights,
as kernels/bench.py). The older tree is unpacked beside the working tree (git archive) and run first:

    (cd tools/.base && PYTHONPATH=$PWD python3 ../kernel_outputs.py save $OUT/old.pt)
    python3 tools/kernel_outputs.py save $OUT/new.pt [--tokens 1,2,4,8] [--no-attention]
    python3 tools/kernel_outputs.py compare $OUT/old.pt $OUT/new.pt
"""
import argparse

import torch


def save(path: str, token_counts: list[int], attention: bool) -> None:
    from gptoss_serve.kernels import bench as kb
    from gptoss_serve.kernels.attention_decode import paged_attention_decode
    from gptoss_serve.kernels.moe_matmul import moe_experts
    from gptoss_serve.kernels.moe_ref import route_ref

    out = {}
    for num_experts in (32, 128):
        gen = torch.Generator(device="cuda").manual_seed(num_experts)
        layers = kb.serving_layers(num_experts, gen, 2880, 2880)
        for num_tokens in token_counts:
            x = torch.randn(num_tokens, 2880, device="cuda", generator=gen).to(torch.bfloat16)
            weights, ids = route_ref(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), 4)

            def run(w):
                return moe_experts(x, weights, ids, *w, 1.702, 7.0, **kb.serving_layout_args())

            out[f"moe {num_experts} experts {num_tokens} tok"] = run(layers[0]).cpu()
            ms = kb._bench(lambda: [run(w) for w in layers]) / kb.NUM_COPIES
            print(f"TIME moe {num_experts} experts {num_tokens} tok: {ms * 1e3:.1f} us", flush=True)
        del layers
        torch.cuda.empty_cache()
    torch.manual_seed(5)
    shapes = ((1, 1024), (1, 8192), (1, 32768), (32, 1024), (32, 8192), (128, 1024)) if attention else ()
    for num_seqs, context in shapes:
        caches, tables = kb._kv_setup(num_seqs, context, 16, torch.Generator().manual_seed(num_seqs))
        q = torch.randn(num_seqs, 64, 64, device="cuda").to(torch.bfloat16)
        sinks = torch.randn(64, device="cuda")
        lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
        out[f"attn batch {num_seqs} ctx {context}"] = paged_attention_decode(q, *caches[0], tables, lens, sinks,
                                                                             0.125).cpu()
        ms = kb._bench(lambda: [paged_attention_decode(q, k, v, tables, lens, sinks, 0.125) for k, v in caches])
        print(f"TIME attn batch {num_seqs} ctx {context}: {ms / kb.NUM_COPIES * 1e3:.1f} us", flush=True)
        del caches
    torch.save(out, path)


def compare(path_a: str, path_b: str) -> None:
    a, b = torch.load(path_a), torch.load(path_b)
    for key in a:
        diff = (a[key].float() - b[key].float()).abs().max().item()
        print(f"{key}: equal={torch.equal(a[key], b[key])} max|diff|={diff:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--tokens", default="1,2,4,8,64,1024,4096")
    parser.add_argument("--no-attention", action="store_true")
    args = parser.parse_args()
    if args.action == "save":
        save(args.paths[0], [int(t) for t in args.tokens.split(",")], not args.no_attention)
    else:
        compare(*args.paths)
