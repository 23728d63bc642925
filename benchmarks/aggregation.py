"""Server aggregation at ViT-B/16 sizes: each method's fast path against its dense textbook reference, and the
cost of a round as the number of clients grows.

    python benchmarks/aggregation.py                      # K in {6, 18, 30} x r in {4, 16, 32}
    python benchmarks/aggregation.py --quick              # K = 6, r = 16 only
    python benchmarks/aggregation.py --out benchmarks/results/aggregation.json
    python benchmarks/aggregation.py --sweep              # K in {6, 30, 100, 300, 1000}, r = 16, against two floors
    python benchmarks/aggregation.py --mixed              # K = 6 at ranks {4, 8, 16}: LoRA-FAIR (one Eq. 8 per
                                                          # rank), FedIT and HetLoRA against their dense references

The sweep times one `aggregate` call per method against two floors measured in the same run: plain weighted
averaging of A and B (stacked einsum per layer) and the dense ideal update dW = sum p_k B_k A_k (one matmul per
layer) plus cos(dW, B_bar A_bar). At K >= 1000 it runs on one attn.proj and one mlp.fc2 layer (2 of the 24) to
keep the run short and the updates in memory; rows say how many layers they used.

Layers: 12 blocks x (attn.proj 768 x 768, mlp.fc2 768 out x 3072 in) = 24 LoRA layers, float32, random factors
with unequal client weights. Seconds are wall time of one call (best of three for calls under a second), both paths
measured in the same run. Peak memory is the highest total of torch CPU allocations during the call, read from the
torch profiler's allocation events (inputs excluded; tracemalloc does not see torch's allocator).

Extrapolation, marked "~" in the table: the dense LoRA-FAIR SGD runs 0 and --dense-steps steps and its time is
extrapolated linearly to --steps. The peak memory of every SGD run (fast and dense) is measured over --dense-steps
steps: it does not grow with the step count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet on machines without a GPU

import torch
from torch.profiler import ProfilerActivity, profile

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.aggregation.reference import dense_reference

VIT_B_LAYERS = {f"blocks.{b}.{kind}": shape for b in range(12)
                for kind, shape in (("attn.proj", (768, 768)), ("mlp.fc2", (768, 3072)))}
"""name -> (out, in)."""
VARIANTS = [
    ("fedit", {}), ("ffa_lora", {}), ("flora", {}), ("flexlora", {}),
    ("lorafair", {"objective": "cosine"}), ("lorafair", {"objective": "column_cosine"}),
    ("lorafair", {"objective": "frobenius"}), ("florana", {}), ("fedex_lora", {}), ("fedsvd", {}),
    ("hetlora", {}), ("frlora", {}), ("fed_sb", {}),
]


MIXED_VARIANTS = [("lorafair", {"objective": "cosine"}),
                  ("lorafair", {"objective": "cosine", "lower_ranks": "zero_pad"}), ("fedit", {}), ("hetlora", {})]
"""The mixed-rank row: LoRA-FAIR solving Eq. 8 per rank, zero-padding only, plain averaging and HetLoRA's
norm-weighted averaging."""


def make_updates(clients: int, rank: int, dtype: torch.dtype, seed: int = 0,
                 layers: dict[str, tuple[int, int]] = VIT_B_LAYERS) -> list[ClientUpdate]:
    """Factors at the scale of trained LoRA: A like its Kaiming start, B small."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for client in range(clients):
        lora = {name: (torch.randn(rank, fan_in, generator=generator, dtype=dtype) / fan_in**0.5,
                       0.01 * torch.randn(fan_out, rank, generator=generator, dtype=dtype))
                for name, (fan_out, fan_in) in layers.items()}
        updates.append(ClientUpdate(weight=100 + 37 * client, lora=lora))
    return updates


def shared_updates(updates: list[ClientUpdate], method: str) -> list[ClientUpdate]:
    """The updates with every factor the method's clients return as given (its client rule freezes it in round 1:
    A for FFA-LoRA and FedSVD, B for Fed-SB) taken from client 0, as the method requires."""
    frozen = build_aggregator(method).client_rule(1).frozen
    first = updates[0].lora
    return [ClientUpdate(u.weight, {n: (first[n][0] if "A" in frozen else A, first[n][1] if "B" in frozen else B)
                                    for n, (A, B) in u.lora.items()}) for u in updates]


def mixed_rank_updates(clients: int, ranks: tuple[int, ...], dtype: torch.dtype) -> list[ClientUpdate]:
    """make_updates at the largest rank, client k cut to its leading ranks[k % len(ranks)] components."""
    updates = make_updates(clients, max(ranks), dtype)
    return [ClientUpdate(u.weight, {name: (A[:rank].clone(), B[:, :rank].clone()) for name, (A, B) in u.lora.items()})
            for u, rank in zip(updates, (ranks[k % len(ranks)] for k in range(clients)), strict=True)]


def seconds(call: Callable[[], object]) -> float:
    """Wall time of one call; best of three when a call takes under a second."""
    start = time.perf_counter()
    call()
    best = time.perf_counter() - start
    if best < 1.0:
        for _ in range(2):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
    return best


def peak_bytes(call: Callable[[], object]) -> int:
    """Highest total of torch CPU allocations made during the call (profiler allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


SWEEP_CLIENTS = (6, 30, 100, 300, 1000)
SWEEP_VARIANTS = [(method, options) for method, options in VARIANTS if options.get("objective") != "column_cosine"]
SWEEP_VARIANTS += [("fedsa_lora", {}), ("rolora", {}), ("feddpa", {})]
"""The sweep's methods: the grid's (but LoRA-FAIR's column cosine) and those whose server step is a plain average of
the factors they upload (FedSA-LoRA: A; RoLoRA: the round's factor; FedDPA: the shared pair), which have no dense
reference of their own and are timed against the floors only."""
SUBSET_FROM_CLIENTS = 1000
SUBSET = ("blocks.0.attn.proj", "blocks.0.mlp.fc2")


def normalised(updates: list[ClientUpdate]) -> list[float]:
    total = sum(update.weight for update in updates)
    return [update.weight / total for update in updates]


def floor_average(updates: list[ClientUpdate]) -> None:
    """Plain weighted averaging of A and of B, one stacked einsum per layer."""
    p = torch.tensor(normalised(updates))
    for name in updates[0].lora:
        torch.einsum("k,kri->ri", p, torch.stack([update.lora[name][0] for update in updates]))
        torch.einsum("k,kor->or", p, torch.stack([update.lora[name][1] for update in updates]))


def floor_dense(updates: list[ClientUpdate]) -> None:
    """dW = sum p_k B_k A_k as one matmul per layer, and cos(dW, B_bar A_bar)."""
    p = normalised(updates)
    for name in updates[0].lora:
        A_stack = torch.cat([update.lora[name][0] for update in updates])
        B_stack = torch.cat([weight * update.lora[name][1] for weight, update in zip(p, updates, strict=True)], 1)
        A_bar = sum(weight * update.lora[name][0] for weight, update in zip(p, updates, strict=True))
        B_bar = sum(weight * update.lora[name][1] for weight, update in zip(p, updates, strict=True))
        torch.nn.functional.cosine_similarity((B_stack @ A_stack).flatten(), (B_bar @ A_bar).flatten(), dim=0)


def sweep(clients_list: list[int], methods: list[str] | None, skip_above: dict[str, int]) -> list[dict]:
    """One row per K: the two floors and every method's seconds, ratio to the dense floor and peak memory."""
    rows = []
    for clients in clients_list:
        layers = {n: VIT_B_LAYERS[n] for n in SUBSET} if clients >= SUBSET_FROM_CLIENTS else VIT_B_LAYERS
        updates = make_updates(clients, 16, torch.float32, layers=layers)
        row = {"K": clients, "layers": len(updates[0].lora),
               "floor_average_s": seconds(partial(floor_average, updates)),
               "floor_dense_s": seconds(partial(floor_dense, updates)), "methods": {}}
        print(f"K={clients:<5} layers={row['layers']:<3} floors: averaging {row['floor_average_s']:.3f} s, "
              f"dense {row['floor_dense_s']:.3f} s", flush=True)
        for method, options in SWEEP_VARIANTS:
            label = method + (f"[{options['objective']}]" if "objective" in options else "")
            if (methods and label not in methods) or clients > skip_above.get(label, clients):
                continue
            used = shared_updates(updates, method)
            call = partial(build_aggregator(method, **options).aggregate, used)
            took, peak = seconds(call), peak_bytes(call)
            row["methods"][label] = {"s": took, "vs_dense_floor": took / row["floor_dense_s"], "peak_bytes": peak}
            print(f"  {label:<24} {took:>8.3f} s {took / row['floor_dense_s']:>6.2f}x dense floor "
                  f"{peak / 2**20:>9.1f} MiB", flush=True)
        rows.append(row)
    return rows


def measure(method: str, options: dict, updates: list[ClientUpdate], steps: int, dense_steps: int) -> dict:
    sgd = method == "lorafair" and options["objective"] != "frobenius"
    fast_options = {**options, "steps": steps} if sgd else options
    fast = build_aggregator(method, **fast_options)
    row = {"fast_s": seconds(lambda: fast.aggregate(updates))}
    short = build_aggregator(method, **{**options, "steps": dense_steps}) if sgd else fast
    row["fast_peak_bytes"] = peak_bytes(lambda: short.aggregate(updates))
    if sgd:
        setup = seconds(lambda: dense_reference(method, updates, **options, steps=0))
        ran = seconds(lambda: dense_reference(method, updates, **options, steps=dense_steps))
        row["dense_s"] = setup + (ran - setup) * steps / dense_steps
        row["dense_peak_bytes"] = peak_bytes(lambda: dense_reference(method, updates, **options, steps=dense_steps))
    else:
        row["dense_s"] = seconds(lambda: dense_reference(method, updates, **options))
        row["dense_peak_bytes"] = peak_bytes(lambda: dense_reference(method, updates, **options))
    row["speedup"] = row["dense_s"] / row["fast_s"]
    row["extrapolated"] = sgd
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only K = 6, r = 16")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=500, help="LoRA-FAIR SGD steps (fast path, and the dense "
                                                                "time is extrapolated to this)")
    parser.add_argument("--dense-steps", type=int, default=10, help="dense SGD steps actually run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sweep", action="store_true", help="K in --clients, r = 16, against the two floors")
    parser.add_argument("--mixed", action="store_true", help="only K = 6 at ranks {4, 8, 16}, LoRA-FAIR, FedIT and "
                                                                 "HetLoRA")
    parser.add_argument("--clients", type=str, default=",".join(map(str, SWEEP_CLIENTS)),
                        help="sweep: comma-separated K")
    parser.add_argument("--methods", type=str, default="", help="sweep: comma-separated labels (default: all)")
    parser.add_argument("--skip-above", type=str, default="",
                        help="sweep: label=K,... runs that method only up to K clients")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        skip_above = {label: int(k) for label, k in (item.split("=") for item in args.skip_above.split(",") if item)}
        methods = [m for m in args.methods.split(",") if m]
        labels = [method + (f"[{options['objective']}]" if "objective" in options else "")
                  for method, options in SWEEP_VARIANTS]
        unknown = sorted(set(methods) - set(labels))
        if unknown:
            parser.error(f"--methods: {', '.join(unknown)} not in the sweep; choose from {', '.join(labels)}")
        rows = sweep([int(k) for k in args.clients.split(",")], methods, skip_above)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            machine = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
            args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
            print(f"wrote {args.out}")
        return
    grid = [(6, 16)] if args.quick else [(k, r) for k in (6, 18, 30) for r in (4, 16, 32)]
    grid = [(6, (4, 8, 16))] if args.mixed else grid
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_average_at_start": os.getloadavg()[0]}
    rows = []
    header = (f"{'K':>3} {'r':>3}  {'method':<24} {'fast s':>9} {'dense s':>10} {'speed-up':>9} "
              f"{'fast MiB':>9} {'dense MiB':>10}")
    print(f"ViT-B/16, 24 LoRA layers, float32, {machine['torch_threads']} torch threads, {machine['cores']} cores")
    print(header)
    for clients, rank in grid:
        updates = mixed_rank_updates(clients, rank, torch.float32) if args.mixed else \
            make_updates(clients, rank, torch.float32)
        for method, options in MIXED_VARIANTS if args.mixed else VARIANTS:
            used = shared_updates(updates, method)
            row = {"K": clients, "r": rank, "method": method, "options": options,
                   **measure(method, options, used, args.steps, args.dense_steps)}
            rows.append(row)
            label = method + (f"[{options['objective']}]" if "objective" in options else "")
            mark = "~" if row["extrapolated"] else " "
            label += "[zero_pad]" if options.get("lower_ranks") == "zero_pad" else ""
            ranks = "/".join(map(str, rank)) if args.mixed else rank
            print(f"{clients:>3} {ranks:>3}  {label:<24} {row['fast_s']:>9.3f} {mark}{row['dense_s']:>9.2f} "
                  f"{mark}{row['speedup']:>8.1f} {row['fast_peak_bytes'] / 2**20:>9.1f} "
                  f"{row['dense_peak_bytes'] / 2**20:>10.1f}", flush=True)
    machine["load_average_at_end"] = os.getloadavg()[0]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine, "steps": args.steps, "dense_steps": args.dense_steps, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
