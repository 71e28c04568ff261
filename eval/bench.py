"""Benchmarks. Each prints a table and ends with one JSON line of all its figures.

    python -m eval.bench kernels   # log-prob/entropy head: naive vs chunked torch vs Triton
    python -m eval.bench sampler   # rollout tokens/s: the trainer's sampler vs batched generate, vs the bound
    python -m eval.bench step      # seconds per GRPO step and its split, peak memory
    python -m eval.bench learn     # pure RL on one easy prompt: the reward curve
    python -m eval.bench trl       # TRL's GRPOTrainer at `step`'s settings (needs pip install trl datasets)
    python -m eval.bench checker   # reward/checker throughput
    python -m eval.bench data      # AST validation records/s
"""
from __future__ import annotations

import json
import platform
import sys
import time

import torch


def machine_info() -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def bench_kernels(argv):
    """Log-prob + entropy head at lm_head shapes: naive (full fp32 logits, log_softmax + gather + entropy),
    chunked torch, Triton (CUDA), and the bare lm_head matmul (forward + backward: the compute floor).

    Time: median over --repeats, variants interleaved in one process. "fwd" is the no-grad forward (how old and
    reference policies are scored), "fwd+bwd" a forward with grad followed by backward of sum(logp).
    Peak extra memory of fwd+bwd above the inputs: on CUDA torch.cuda.max_memory_allocated minus the allocation
    before the call; on CPU, per variant in a fresh subprocess, the kernel's resident-set high-water mark
    (VmHWM, reset through /proc/self/clear_refs after the inputs exist) minus the resident set before the call.
    Both include the gradients the call returns (grad_W is [V, H]), which every variant produces.
    """
    import argparse
    import os
    import statistics
    import subprocess

    from model.kernels import logprob_entropy, naive_logprob_entropy, triton_available

    shapes = {"smollm2-135m": (4096, 576, 49152), "qwen2.5-0.5b": (4096, 896, 151936),
              "qwen2.5-7b": (16384, 3584, 151936), "tiny": (128, 64, 151936)}
    parser = argparse.ArgumentParser(prog="python -m eval.bench kernels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(shapes)} (default: all on GPU, "
                        "the first two on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="override N (tokens) for every shape")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5 GPU, 1 CPU)")
    parser.add_argument("--variants", default=None, help="comma list of naive, chunked, triton, matmul")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one CPU memory measurement
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def make_inputs(n, h, v):
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g).to(device)
        return hidden, weight, targets

    def run(variant, hidden, weight, targets, backward):
        hidden.grad = weight.grad = None
        with torch.set_grad_enabled(backward):
            if variant == "matmul":
                out = hidden @ weight.T  # [N, V] in the input dtype
                if backward:
                    out.backward(torch.ones_like(out))
                return
            if variant == "naive":
                logp, _ = naive_logprob_entropy(hidden, weight, targets, args.temperature)
            else:
                backend = "torch" if variant == "chunked" else "triton"
                logp, _ = logprob_entropy(hidden, weight, targets, args.temperature, backend=backend)
            if backward:
                logp.sum().backward()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def rss_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} missing from /proc/self/status")

    if args.worker:  # fresh process: inputs, then one fwd+bwd under a reset high-water mark
        variant, n, h, v = args.worker.split(",")
        hidden, weight, targets = make_inputs(int(n), int(h), int(v))
        before = rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        run(variant, hidden, weight, targets, backward=True)
        print(json.dumps({"peak_mb": (rss_kb("VmHWM") - before) / 1024}))
        return None

    names = (args.shapes or ",".join(list(shapes) if cuda else list(shapes)[:2])).split(",")
    for name in names:
        if name not in shapes:
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(shapes)}")
    variants = (args.variants or "naive,chunked,triton,matmul").split(",")
    if "triton" in variants and not (cuda and triton_available()):
        variants.remove("triton")  # the interpreter is for tests, not for timing
    repeats = args.repeats or (5 if cuda else 1)
    rows = []
    for name in names:
        n, h, v = shapes[name]
        n = args.tokens or n
        hidden, weight, targets = make_inputs(n, h, v)
        times = {(var, bwd): [] for var in variants for bwd in (False, True)}
        peaks = {}
        if cuda:  # warm-up (Triton compiles and tunes on first use) and memory, one variant at a time
            for var in variants:
                run(var, hidden, weight, targets, backward=True)
                run(var, hidden, weight, targets, backward=False)
                hidden.grad = weight.grad = None
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                run(var, hidden, weight, targets, backward=True)
                sync()
                peaks[var] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                hidden.grad = weight.grad = None
        else:
            for var in variants:
                print(f"[bench] {name} {var}: peak memory in a subprocess", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, "-m", "eval.bench", "kernels", "--worker", f"{var},{n},{h},{v}",
                                       "--device", "cpu", "--temperature", str(args.temperature)],
                                      capture_output=True, text=True, env=dict(os.environ))
                if proc.returncode != 0:
                    raise SystemExit(f"memory worker for {var} failed:\n{proc.stderr[-2000:]}")
                peaks[var] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
        for rep in range(repeats):
            for var in variants:
                for bwd in (False, True):
                    print(f"[bench] {name} {var} {'fwd+bwd' if bwd else 'fwd'} run {rep + 1}/{repeats}",
                          file=sys.stderr, flush=True)
                    sync()
                    t0 = time.perf_counter()
                    run(var, hidden, weight, targets, backward=bwd)
                    sync()
                    times[(var, bwd)].append(time.perf_counter() - t0)
        for var in variants:
            rows.append({"shape": name, "N": n, "H": h, "V": v, "variant": var,
                         "fwd_ms": 1e3 * statistics.median(times[(var, False)]),
                         "fwd_bwd_ms": 1e3 * statistics.median(times[(var, True)]), "peak_mb": peaks[var]})
        del hidden, weight, targets
        if cuda:
            torch.cuda.empty_cache()

    # the targets, as ratios (memory: naive / variant; time: variant / reference)
    for r in rows:
        same = {x["variant"]: x for x in rows if x["shape"] == r["shape"]}
        if r["variant"] in ("chunked", "triton") and "naive" in same:
            r["mem_saving_x"] = same["naive"]["peak_mb"] / max(r["peak_mb"], 1e-9)
            r["fwd_bwd_vs_naive"] = r["fwd_bwd_ms"] / same["naive"]["fwd_bwd_ms"]
        if r["variant"] in ("chunked", "triton") and "matmul" in same:
            r["fwd_bwd_vs_matmul"] = r["fwd_bwd_ms"] / same["matmul"]["fwd_bwd_ms"]
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, temperature {args.temperature}, "
          f"median of {repeats}")
    print_table(rows, ["shape", "N", "H", "V", "variant", "fwd_ms", "fwd_bwd_ms", "peak_mb", "mem_saving_x",
                       "fwd_bwd_vs_naive", "fwd_bwd_vs_matmul"])
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "temperature": args.temperature,
            "repeats": repeats, "results": rows}


def machine_ceilings(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Measured ceilings of this machine: dense matmul FLOP/s in `dtype` (default: the compute dtype, bf16 on CUDA
    and fp32 on CPU), and memory copy bandwidth (bytes read + written per second). They bound what decoding can
    reach (see `decode_bound_s`)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 4096 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(2 ** 26 if device.type == "cuda" else 2 ** 25, device=device)  # 256 / 128 MiB fp32
    dst = torch.empty_like(src)

    def best_of(fn, repeats):
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    flops = 2 * n ** 3 / best_of(lambda: a @ b, 3)
    copy = 2 * src.numel() * src.element_size() / best_of(lambda: dst.copy_(src), 3)
    return {"matmul_flops": flops, "copy_bytes_per_s": copy}


def decode_bound_s(model, prompt_tokens: int, completion_lengths: list[int], ceilings: dict,
                   weight_bytes_each: int | None = None) -> float:
    """Least time the work could take on this machine: every matmul weight is read once per decode step (steps =
    the longest completion: rows decode in lockstep), and 2 FLOPs per weight per token processed (each distinct
    prompt token once, each useful completion token once); the larger of the two. Attention FLOPs and the KV
    cache reads are left out, so the bound is optimistic. weight_bytes_each: bytes per weight as the matmuls read
    it (default: the model's; 2 under bf16 autocast, with ceilings measured in bf16)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    matmul_weights = sum(p.numel() for p in model.parameters()) - embed.numel() + \
        (head.numel() if head is embed else 0)
    weight_bytes = matmul_weights * (weight_bytes_each or embed.element_size())
    compute_s = 2 * matmul_weights * (prompt_tokens + sum(completion_lengths)) / ceilings["matmul_flops"]
    bandwidth_s = max(completion_lengths, default=0) * weight_bytes / ceilings["copy_bytes_per_s"]
    return max(compute_s, bandwidth_s)


def bench_sampler(argv):
    """Completion tokens/s of model.sample.sample as the trainer calls it (a seed per completion, log-probs
    recorded) on the default data's prompts (rendered as the trainer renders them), against plain batched generate()
    with num_return_sequences=G and a naive loop of one generate() per completion; with ablations of the sampler's
    parts. Completions have their natural lengths: every method's tokens are counted up to each row's first EOS
    (included), so time spent on rows that are already done counts against a method. Each method runs on the same
    --rounds prompt sets (a round is one trainer step's prompts), interleaved, and is compared with the machine's
    bound (`decode_bound_s` over the measured `machine_ceilings`).
    CPU: the embedded default model, or --model (a checkpoint directory). GPU (or --random): a randomly initialised
    Qwen2.5-shaped model with the Qwen-sized tokenizer stub; there the static-cache + compiled sampler runs too."""
    import argparse
    import random

    from data.calls import PromptFormat, render_prompt
    from data.default import load_default
    from model.load import autocast_to, pick_rollout_dtype
    from model.sample import eos_token_ids, pad_id_of, sample

    ap = argparse.ArgumentParser(prog="python -m eval.bench sampler")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per round (train.py --prompts-per-step)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96, help="completion length cap (train.py --max-new-tokens)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3, help="prompt sets (steps) timed per method")
    ap.add_argument("--naive-completions", type=int, default=4,
                    help="completions the naive loop times (its tokens/s does not depend on how many)")
    ap.add_argument("--model", default="smollm2-135m", help="CPU model: smollm2-135m or a checkpoint directory")
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="GPU model shape (model.tiny.QWEN25_SHAPES)")
    ap.add_argument("--random", action="store_true", help="a random --shape model on CPU too (default on GPU)")
    ap.add_argument("--answer-format", default="think", help="prompt format (as train.py)")
    ap.add_argument("--tools-as", default="python")
    ap.add_argument("--prefill", default="<think>")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-ablations", "--skip-expand", action="store_true",
                    help="time only the full sampler (not the variants without one of its parts)")
    ap.add_argument("--static", default="auto", choices=["auto", "on", "off"],
                    help="also time the static-cache sampler with its compiled decode step (auto: on CUDA only)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the bound (default: "
                    "measured by a copy)")
    ap.add_argument("--rollout-dtype", default="auto", help="the sampler's precision, as train.py --rollout-dtype "
                    "(auto: bf16 where the device has native bf16); plain generate runs in the model's dtype, and "
                    "also in this one when they differ")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" or args.random:
        from model.tiny import qwen_shaped_model, qwen_stub_tokenizer
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tok = qwen_shaped_model(args.shape, dtype=dtype, device=device).eval(), qwen_stub_tokenizer()
        model_name = f"random {args.shape} {str(dtype).removeprefix('torch.')}"
    else:
        from model.load import load
        model, tok = load(args.model, device="cpu")
        model.eval()
        model_name = args.model

    fmt = PromptFormat(args.answer_format, args.tools_as, args.prefill)
    records = load_default("train")
    picks = random.Random(0).sample(range(len(records)), args.rounds * args.prompts)
    rounds = []  # per round: the prompts' token ids
    for r in range(args.rounds):
        chosen = [records[i] for i in picks[r * args.prompts:(r + 1) * args.prompts]]
        rounds.append([tok(render_prompt(tok, rec["messages"], rec["tools"], fmt), add_special_tokens=False).input_ids
                       for rec in chosen])
    G, new = args.group_size, args.new_tokens
    eos = set(eos_token_ids(model, tok))

    def useful(row: list[int]) -> list[int]:  # up to and including the first EOS
        return next((row[:t + 1] for t, x in enumerate(row) if x in eos), row)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain_batched(prompts, r):  # transformers' own sampling: dynamic cache, no compile, rows run to the longest
        P = max(len(p) for p in prompts)
        x = torch.tensor([[pad_id_of(tok)] * (P - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
        torch.manual_seed(r)
        out = model.generate(x, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0,
                             top_p=1.0, max_new_tokens=new, num_return_sequences=G, pad_token_id=pad_id_of(tok))
        return [useful(row) for row in out[:, P:].tolist()]

    def naive(prompts, r):  # one generate() per completion, for the first --naive-completions completions
        rows = []
        for p in [p for p in prompts for _ in range(G)][:args.naive_completions]:
            x = torch.tensor([p], device=device)
            torch.manual_seed(r + len(rows))
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=args.temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=new, pad_token_id=pad_id_of(tok))
            rows.append(useful(out[0, len(p):].tolist()))
        return rows

    def sampler(**options):
        def run(prompts, r):
            seeds = [r * 10_000 + n for n in range(len(prompts) * G)]
            out = sample(model, tok, prompts, group_size=G, max_new_tokens=new, temperature=args.temperature,
                         row_seeds=seeds, return_logprobs=True, **options)
            return out.completion_ids
        return run

    model_dtype = next(model.parameters()).dtype
    rollout_dtype = pick_rollout_dtype(args.rollout_dtype, model_dtype, device)
    lower = rollout_dtype != model_dtype  # the trainer then samples under autocast (its weights cast once per call)
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731

    methods = {}  # key -> (label, fn, the dtype its matmuls run in)

    def add(key, label, fn, dtype):  # fn runs as the trainer runs its rollouts: under autocast to `dtype`
        def run(prompts, r):
            with autocast_to(dtype, device):
                return fn(prompts, r)
        methods[key] = (f"{label}, {name(dtype)}" if not label.startswith(" ") else label, run, dtype)

    if not args.skip_naive:
        add("naive", "naive loop (1 generate per completion)", naive, model_dtype)
    add("batched", "batched generate (num_return_sequences)", plain_batched, model_dtype)
    if lower:
        add("batched_rollout_dtype", "batched generate", plain_batched, rollout_dtype)
    add("sampler_trainer", "sampler, trainer config (all parts)", sampler(), rollout_dtype)
    if lower:
        add("sampler_trainer_model_dtype", "sampler, trainer config", sampler(), model_dtype)
    if not args.skip_ablations:
        add("sampler_no_prune", "  without dropping finished rows", sampler(decode_chunk=new), rollout_dtype)
        add("sampler_no_prefix", "  without the shared prefix", sampler(share_prefix=False), rollout_dtype)
        add("sampler_no_grouped", "  without grouped decoding (G copies of each prompt's keys and values)",
            sampler(grouped_decode=False), rollout_dtype)
        add("sampler_expand", "  expand then prefill, nothing shared or dropped",
            sampler(prefill_once=False, share_prefix=False, decode_chunk=new), rollout_dtype)
    static = args.static == "on" or (args.static == "auto" and device.type == "cuda")
    compile_s = None
    if static:
        add("sampler_trainer_static", "sampler, trainer config, static cache + compiled decode",
            sampler(static_cache=True), rollout_dtype)
        t0 = time.perf_counter()
        methods["sampler_trainer_static"][1](rounds[0], 0)  # first call: compiles (on any device)
        sync()
        compile_s = time.perf_counter() - t0

    ceilings = machine_ceilings(device)
    if args.bandwidth_gbs:
        ceilings["copy_bytes_per_s"] = args.bandwidth_gbs * 1e9
    # each method's bound in the precision its matmuls run in
    ceilings_in = {model_dtype: ceilings}
    if lower:
        ceilings_in[rollout_dtype] = dict(ceilings, matmul_flops=machine_ceilings(device, rollout_dtype)["matmul_flops"])
    totals = {key: {"tokens": 0, "seconds": 0.0, "bound_s": 0.0} for key in methods}
    with torch.no_grad():
        for r, prompts in enumerate(rounds):
            for key, (label, fn, dtype) in methods.items():
                if key == "naive" and r > 0:
                    continue
                sync()
                t0 = time.perf_counter()
                rows = fn(prompts, r)
                sync()
                seconds = time.perf_counter() - t0
                lengths = [len(row) for row in rows]
                prompt_tokens = sum(len(p) for p in prompts) if key != "naive" else \
                    sum(len(p) for p in [p for p in prompts for _ in range(G)][:args.naive_completions])
                totals[key]["tokens"] += sum(lengths)
                totals[key]["seconds"] += seconds
                totals[key]["bound_s"] += decode_bound_s(model, prompt_tokens, lengths, ceilings_in[dtype],
                                                         dtype.itemsize)
                print(f"  round {r}: {label.strip()}: {sum(lengths)} tokens in {seconds:.2f}s", file=sys.stderr,
                      flush=True)

    rows = []
    for key, (label, _, _) in methods.items():
        t = totals[key]
        rows.append({"key": key, "method": label, "tokens": t["tokens"], "seconds": t["seconds"],
                     "tok_per_s": t["tokens"] / t["seconds"], "bound_fraction": t["bound_s"] / t["seconds"]})
    by = {r["key"]: r for r in rows}
    for r in rows:
        r["x_naive"] = r["tok_per_s"] / by["naive"]["tok_per_s"] if "naive" in by else None
        r["x_batched"] = r["tok_per_s"] / by["batched"]["tok_per_s"]
    lengths = [len(p) for prompts in rounds for p in prompts]
    print(f"sampler: {model_name} on {device.type}, {args.rounds} rounds of {args.prompts} default-data prompts "
          f"({min(lengths)}-{max(lengths)} tokens) x G={G}, up to {new} new tokens, temperature {args.temperature}, "
          f"{torch.get_num_threads()} threads; ceilings: "
          + ", ".join(f"{c['matmul_flops'] / 1e9:.0f} GFLOP/s {name(dt)} matmul" for dt, c in ceilings_in.items())
          + f", {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s copy")
    print_table(rows, ["method", "tokens", "seconds", "tok_per_s", "x_naive", "x_batched", "bound_fraction"])
    result = {"model": model_name, "device": device.type, "rounds": args.rounds, "prompts": args.prompts,
              "group_size": G, "new_tokens": new, "prompt_tokens": lengths,
              "matmul_gflops": round(ceilings["matmul_flops"] / 1e9, 1),
              "copy_gbs": round(ceilings["copy_bytes_per_s"] / 1e9, 2), "rollout_dtype": name(rollout_dtype)}
    if lower:
        result[f"matmul_gflops_{name(rollout_dtype)}"] = round(ceilings_in[rollout_dtype]["matmul_flops"] / 1e9, 1)
    for r in rows:
        result[f"{r['key']}_tok_per_s"] = round(r["tok_per_s"], 2)
        result[f"{r['key']}_bound_fraction"] = round(r["bound_fraction"], 4)
    if compile_s is not None:
        result["sampler_trainer_static_first_call_s"] = round(compile_s, 1)
    result["sampler_x_batched"] = round(by["sampler_trainer"]["x_batched"], 2)
    result["sampler_x_naive"] = round(by["sampler_trainer"]["x_naive"], 2) if "naive" in by else None
    return result


def _train_subprocess(args: list[str], out_dir: str) -> list[dict]:
    """Run train.py as a user would (it is a script, not a library) and return its metrics rows."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(root / "train.py"), "--out-dir", out_dir, *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, env=env, check=True)
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _children_peak_rss_gb() -> float:
    """The largest peak resident set (ru_maxrss) of the child processes this process has waited for, in GiB.
    `step` and `trl` each run their training in one child process and read this after it ends, so both report
    the same thing: the training process's high-water mark, model loading and everything else included."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB


# The settings `step` runs train.py at, and `trl` runs TRL's GRPOTrainer at. Both run the same number of steps by
# default, so both count the same prompts: how long the model answers differs a lot from prompt to prompt (at seed 0
# the base model's completions average about 66, 92 and 111 tokens on the prompts of steps 2, 3 and 4).
STEP_SETTINGS = dict(prompts_per_step=2, group_size=8, kl_coef=0.001, temperature=0.7, lr=2e-5, seed=0, steps=4)


def bench_step(argv):
    """Seconds per GRPO step and its split, at fixed settings: the default model on CPU, 2 prompts x G=8,
    128 new tokens, KL 0.001 (reference model loaded), no warm-up, the trainer's other defaults; the first step is
    excluded (warm-up of allocators and caches). Peak memory: the training process's peak resident set
    (ru_maxrss of the child process, loading included), measured the same way as `trl`'s."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m eval.bench step")
    ap.add_argument("--steps", type=int, default=STEP_SETTINGS["steps"],
                    help="steps to run; the first is not counted (trl's default is the same)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--extra", default="", help="more train.py flags, e.g. '--share-prompt-kv false'")
    args = ap.parse_args(argv)
    s = STEP_SETTINGS
    with tempfile.TemporaryDirectory() as tmp:
        rows = _train_subprocess(["--model", args.model, "--steps", str(args.steps), "--sft-steps", "0",
                                  "--prompts-per-step", str(s["prompts_per_step"]), "--group-size",
                                  str(s["group_size"]), "--max-new-tokens", str(args.max_new_tokens), "--kl-coef",
                                  str(s["kl_coef"]), "--temperature", str(s["temperature"]), "--lr", str(s["lr"]),
                                  "--seed", str(s["seed"]), "--eval-limit", "0", "--save-every", "0",
                                  "--sample-every", "0", *args.extra.split()], tmp)
    peak_rss = _children_peak_rss_gb()
    steps = [r for r in rows if r.get("phase") == "rl"][1:]
    if not steps:
        raise SystemExit("need --steps >= 2 (the first step is not counted)")
    mean = lambda k: sum(r[k] for r in steps) / len(steps)  # noqa: E731
    result = {"steps_counted": len(steps), "sec_per_step": mean("time_step"), "sample_s": mean("time_sample"),
              "score_s": mean("time_score"), "update_s": mean("time_update"),
              "resp_len_mean": mean("resp_len_mean"), "peak_rss_gb": peak_rss,
              # per counted step, to set beside trl's (the same prompts at the same step)
              "sec_each_step": [round(r["time_step"], 1) for r in steps],
              "resp_len_each_step": [round(r["resp_len_mean"], 1) for r in steps],
              "peak_rss_gb_at_last_step": max(r["peak_mem_gb"] for r in steps),
              # what the process held after each step, the first too: growth here would be memory kept across steps
              "rss_gb_after_steps": [round(r["mem_gb"], 2) for r in rows if r.get("phase") == "rl"],
              "settings": f"{args.model}, 2 prompts x G=8, {args.max_new_tokens} new tokens, beta 0.001"
                          + (f", {args.extra}" if args.extra else "")}
    print_table([{"metric": k, "value": v} for k, v in result.items()], ["metric", "value"])
    return result


def bench_learn(argv):
    """Pure RL (no warm-up) on ONE easy prompt that the base model gets right some of the time: the reward
    should climb clearly (e.g. below 0.3 -> above 0.7). Prints the reward curve.

    The defaults are the settings under which the base model's first successes are not vanishingly rare:
    the bare call list (no <think>), tools as Python signatures, the answer opened with "[", strict binary
    reward. Record default-train-00023 ("Send an email to ... with the subject ...") is one the base model
    answers exactly right in about 1 of 16 samples at temperature 0.7; the paper's think/answer format with
    JSON tools gives the base model no successes at all, hence no gradient."""
    import argparse
    import tempfile
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m eval.bench learn")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--record", default="default-train-00023", help="id of the default training record to use")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5, help="2e-5 (train.py's default); 5e-5 learned faster, then "
                    "collapsed to reward 0 for good at step 16")
    ap.add_argument("--extra", default="", help="more train.py flags (they override the ones above)")
    args = ap.parse_args(argv)
    from data.default import load_default

    record = next((r for r in load_default("train") if r["id"] == args.record), None)
    if record is None:
        raise SystemExit(f"no default training record with id {args.record}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "one.jsonl"
        data.write_text(json.dumps(record) + "\n")
        rows = _train_subprocess(["--train-data", str(data), "--val-data", str(data), "--difficulty", "all",
                                  "--sft-steps", "0", "--steps", str(args.steps), "--prompts-per-step", "1",
                                  "--group-size", str(args.group_size), "--lr", str(args.lr), "--kl-coef", "0",
                                  "--answer-format", "plain", "--tools-as", "python", "--prefill", "[",
                                  "--max-new-tokens", "48", "--eval-limit", "0", "--save-every", "0",
                                  *args.extra.split()], str(Path(tmp) / "run"))
    curve = [r["reward"] for r in rows if r.get("phase") == "rl"]
    k = min(3, len(curve))
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
    print_table([{"step": i + 1, "reward": r} for i, r in enumerate(curve)], ["step", "reward"])
    print(f"reward, mean of the first {k} steps: {first:.2f}; of the last {k}: {last:.2f}")
    return {"record": args.record, "reward_curve": curve, "first3_mean": first, "last3_mean": last,
            "learned": first < 0.3 and last > 0.7}


def bench_trl(argv):
    """Hugging Face TRL's GRPOTrainer at `step`'s settings, for a side-by-side comparison on one machine: the default
    model in fp32, the prompts train.py takes at seed 0 (the easy default training records, in the trainer's
    order), 2 prompts x G=8, 128 new tokens, temperature 0.7 (top-p 1, no top-k), beta 0.001, lr 2e-5 constant,
    AdamW betas (0.9, 0.99), gradient clipping at 1, token-mean loss, group-std advantages, the same reward, and
    TRL's default gradient checkpointing (train.py recomputes its update's activations too, in segments of
    --segment-tokens; --gradient-checkpointing off keeps all of TRL's activations). Seconds per step are from the
    start of a step (before its generation) to its end (after the optimizer step), the first step not counted, as
    in `step`; peak memory is the training process's peak resident set (ru_maxrss of the child process, loading
    included), as in `step`. TRL is not a dependency of this project: pip install trl datasets (a separate
    environment is best)."""
    import argparse
    import os
    import subprocess

    ap = argparse.ArgumentParser(prog="python -m eval.bench trl")
    ap.add_argument("--steps", type=int, default=STEP_SETTINGS["steps"],
                    help="steps to run; the first is not counted (step's default is the same: the same prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on", help="TRL's default: on")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: the training process
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("need --steps >= 2 (the first step is not counted)")
    if args.worker:
        print(json.dumps(_trl_worker(args)))
        return None
    try:
        import trl  # noqa: F401
        import datasets  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"this comparison needs TRL ({e}): pip install trl datasets")
    cmd = [sys.executable, "-m", "eval.bench", "trl", "--worker", "--steps", str(args.steps), "--max-new-tokens",
           str(args.max_new_tokens), "--gradient-checkpointing", args.gradient_checkpointing]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"the TRL training process failed (exit status {proc.returncode}); its errors are above")
    worker = json.loads(proc.stdout.strip().splitlines()[-1])
    times, lengths = worker["step_seconds"], worker["resp_len_mean"]
    result = {"steps_counted": len(times) - 1, "sec_per_step": sum(times[1:]) / (len(times) - 1),
              "resp_len_mean": sum(lengths[1:]) / max(len(lengths) - 1, 1) if len(lengths) > 1 else None,
              "peak_rss_gb": _children_peak_rss_gb(), "trl": worker["trl"],
              "sec_each_step": [round(t, 1) for t in times[1:]],
              "resp_len_each_step": [round(n, 1) for n in lengths[1:]],
              "gradient_checkpointing": args.gradient_checkpointing,
              "settings": f"smollm2-135m, 2 prompts x G=8, {args.max_new_tokens} new tokens, beta 0.001"}
    print_table([{"metric": k, "value": v} for k, v in result.items()], ["metric", "value"])
    return result


def _trl_worker(args) -> dict:
    """The TRL training process of bench_trl: per-step seconds and mean completion lengths."""
    import tempfile

    import pyarrow as pa
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.calls import PromptFormat, render_prompt
    from data.default import load_default
    from model.load import load
    from rl.reward import reward
    from rl.rollout import PromptCursor

    s = STEP_SETTINGS
    model, tokenizer = load("smollm2-135m", dtype="float32")
    # the records train.py takes at this seed (its default data, --difficulty easy), in the same order
    records = [r for r in load_default("train") if r.get("difficulty", "easy") == "easy"]
    cursor = PromptCursor(records, s["seed"])
    records = cursor.take(s["prompts_per_step"] * args.steps)
    prompt_format = PromptFormat(answer_format="think", tools_as="python", prefill="<think>")
    prompts = [render_prompt(tokenizer, r["messages"], r["tools"], prompt_format) for r in records]
    record_of = dict(zip(prompts, records))

    def reward_fn(prompts, completions, **_):
        return [reward(prompt_format.prefill + c, record_of[p], answer_format=prompt_format.answer_format)[0]
                for p, c in zip(prompts, completions)]

    times, lengths = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    G = s["group_size"]
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(output_dir=tmp, per_device_train_batch_size=s["prompts_per_step"] * G, num_generations=G,
                            max_completion_length=args.max_new_tokens, beta=s["kl_coef"],
                            temperature=s["temperature"], top_p=1.0, top_k=0, learning_rate=s["lr"],
                            lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
                            max_grad_norm=1.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
                            gradient_checkpointing=args.gradient_checkpointing == "on", shuffle_dataset=False,
                            max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                            bf16=False, seed=s["seed"])
        # an explicit fingerprint: datasets' default hashing of the table fails with some pyarrow/dill versions
        dataset = Dataset(pa.table({"prompt": prompts}), fingerprint="bench-trl")
        GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=dataset,
                    processing_class=tokenizer, callbacks=[StepTimer()]).train()
    return {"step_seconds": times, "resp_len_mean": lengths, "trl": trl.__version__}


def bench_checker(argv):
    """Parse + check 10,000 BFCL-style outputs (right answers, near misses, prose, malformed) on one core,
    through the BFCL scoring path and through the think-format reward."""
    import argparse
    import random

    from data.calls import check_calls, decode_bfcl_result
    from eval.bfcl import load_category
    from rl.reward import reward

    ap = argparse.ArgumentParser(prog="python -m eval.bench checker")
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    cases = []
    for category in ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                     "irrelevance", "live_irrelevance"):
        for it in load_category(category):
            gt = it["ground_truth"] or []
            calls = []
            for expected in gt:
                (name, params), = expected.items()
                kw = {p: v[0] for p, v in params.items() if v and not (type(v[0]) is str and v[0] == "")}
                calls.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})")
            right = "[" + ", ".join(calls) + "]"
            variants = [right, right.replace("=", "= ", 1), right[: len(right) // 2], "I cannot help with that.",
                        right.upper(), "```\n" + right + "\n```"]
            cases.append((rng.choice(variants), it))
    rng.shuffle(cases)
    cases = (cases * (args.n // len(cases) + 1))[: args.n]

    t0 = time.perf_counter()
    correct = 0
    for text, it in cases:
        correct += check_calls(decode_bfcl_result(text), it["ground_truth"] or [], it["function"], it["category"])[0]
    score_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for text, it in cases:
        reward("<think>ok</think><answer>" + text + "</answer>", it)
    reward_s = time.perf_counter() - t0

    rows = [{"path": "bfcl score (decode + check)", "outputs": len(cases), "seconds": score_s,
             "outputs_per_s": len(cases) / score_s},
            {"path": "reward (think format)", "outputs": len(cases), "seconds": reward_s,
             "outputs_per_s": len(cases) / reward_s}]
    print_table(rows, ["path", "outputs", "seconds", "outputs_per_s"])
    return {"outputs": len(cases), "score_seconds": round(score_s, 3), "reward_seconds": round(reward_s, 3),
            "score_outputs_per_s": round(len(cases) / score_s), "fraction_correct": round(correct / len(cases), 3),
            "target_seconds": 5.0}


def bench_data(argv):
    """AST validation records/s on one core (pure Python, one process), and the whole --skip-llm pipeline
    (read, convert, validate, write) on an xLAM-style file. Records: the embedded default data, with 20%
    given string-typed numbers (safe repairs) and 5% made invalid (rejects)."""
    import argparse
    import random
    import tempfile
    from pathlib import Path

    from data.default import load_default
    from data.prepare import prepare
    from data.validate import RecordError, validate_record

    ap = argparse.ArgumentParser(prog="python -m eval.bench data")
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    rng = random.Random(0)
    base = load_default("train") + load_default("val")
    records = []
    for i in range(args.records):
        r = json.loads(json.dumps(base[i % len(base)]))
        r["id"] = f"{r['id']}-{i}"
        u = rng.random()
        if r["answers"] and u < 0.2:  # numbers as strings: repaired
            a = r["answers"][0]["arguments"]
            for k, v in a.items():
                if type(v) in (int, float):
                    a[k] = str(v)
        elif r["answers"] and u < 0.25:  # an unknown parameter: rejected
            r["answers"][0]["arguments"]["bogus"] = 1
        records.append(r)

    records_json = json.dumps(records)

    def time_ast():
        work = json.loads(records_json)  # validation repairs in place: time fresh copies (copying untimed)
        t0 = time.perf_counter()
        kept = repaired = 0
        for r in work:
            try:
                repaired += bool(validate_record(r))
                kept += 1
            except RecordError:
                pass
        return time.perf_counter() - t0, kept, repaired

    ast_runs = [time_ast() for _ in range(args.repeats)]
    ast_s, kept, repaired = min(ast_runs)

    n_pipe = min(args.records, 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "xlam.jsonl"
        with open(src, "w") as f:
            for r in records[:n_pipe]:
                f.write(json.dumps({"id": r["id"], "query": r["messages"][0]["content"],
                                    "tools": json.dumps(r["tools"]), "answers": json.dumps(r["answers"])}) + "\n")
        pipe_s = []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            stats = prepare([src], Path(tmp) / f"out{k}", progress=False)
            pipe_s.append(time.perf_counter() - t0)
    rows = [{"stage": "ast validation", "records": len(records), "kept": kept, "repaired": repaired,
             "seconds": ast_s, "records_per_s": len(records) / ast_s},
            {"stage": "pipeline --skip-llm", "records": n_pipe, "kept": stats["train"] + stats["val"],
             "repaired": None, "seconds": min(pipe_s), "records_per_s": n_pipe / min(pipe_s)}]
    print_table(rows, ["stage", "records", "kept", "repaired", "seconds", "records_per_s"])
    ast_rate = len(records) / ast_s
    print(f"AST validation: {ast_rate:,.0f} records/s on one core (target >= 20,000)")
    return {"ast_records_per_s": round(ast_rate), "pipeline_records_per_s": round(n_pipe / min(pipe_s)),
            "records": len(records), "target_ast_records_per_s": 20_000, "meets_target": ast_rate >= 20_000}


BENCHES = {"kernels": bench_kernels, "sampler": bench_sampler, "step": bench_step, "checker": bench_checker,
           "data": bench_data, "learn": bench_learn, "trl": bench_trl}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(__doc__)
        raise SystemExit(f"choose one of: {', '.join(BENCHES)}")
    result = BENCHES[argv[0]](argv[1:])
    if result is not None:
        print(json.dumps({"bench": argv[0], **machine_info(), **result}))


if __name__ == "__main__":
    main()
