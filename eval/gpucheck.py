"""One prepared check of every GPU path, verified and measured in about 7 minutes on an H200.

    python -m eval.gpucheck --out gpucheck-report                            # on a CUDA machine
    python -m eval.gpucheck --out DIR --stages 5,7                            # rerun only these stages
    python -m eval.gpucheck --device cpu --tiny --out DIR                     # the same logic at toy sizes (tests)

No weights are needed: the models are randomly initialised Qwen2.5-shaped ones (model/tiny.py) with a tokenizer
stub of Qwen's real vocabulary size (151,665 ids of a 151,936-row head). Each stage appends one JSON line to
DIR/report.jsonl as soon as it ends (stage, name, ok, seconds, estimate, figures, error), so a run killed
half-way leaves a valid report of the stages it finished; a stage whose estimate does not fit in what is left
of --budget is written as skipped with the reason. A table of all stages is printed last.

Stages (their estimates on one H200 are in STAGES below; --tiny on CPU runs each at toy sizes):
  0 environment      versions, device, attention/head/precision paths; bf16 GEMM and copy ceilings
  1 gpu-tests        pytest -m gpu (any skip but "flash-attn not installed" fails); on CPU: marker discipline
                     of every CUDA test, their clean skips, and the Triton kernel tests under the interpreter
  2 head-kernel      the log-prob/entropy head at the 7B shape against float64: values, gradients, padded rows
  3 kernel-bench     eval.bench kernels at the 0.5B and 7B head shapes, as a fraction of stage 0's ceiling
  4 scoring          padded / packed / shared-prompt log-probs in bf16 vs fp32; lr 1e-6 moves fp32 masters
  5 grpo-step        one GRPO step with the trainer's functions at 0.5B and at a truncated 7B scaled per layer
  6 sampler          the sampler in the trainer's configuration vs batched generate, static cache + compile
  7 fsdp             FSDP2 with one rank (NCCL on CUDA): the step equals the unsharded one; collectives work
  8 train-e2e        train.py end to end (warm-up, 2 RL steps, evaluation, checkpoint) + from_pretrained
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """Every size the stages use: one set for an H200, one for CPU runs of the same logic."""
    small_shape: str  # the 0.5B model (scoring, GRPO step, sampler, train.py)
    big_shape: str  # the 7B model (head kernel width, truncated GRPO step)
    big_layers: tuple[int, int]  # two truncated depths of big_shape: their difference gives the cost per layer
    big_full_layers: int  # the depth the truncated runs are scaled to
    head_tokens: int  # stage 2's tokens
    gemm_n: int  # stage 0's square matrix product
    copy_mib: int  # stage 0's copy
    kernel_shapes: str  # eval.bench kernels --shapes
    kernel_repeats: int
    score_prompts: tuple[int, int, int, int]  # prompts, completions per prompt, prompt length, longest completion
    step_prompts: int  # stage 5 and 7: prompts x group_size completions of max_new_tokens
    step_group: int
    step_new_tokens: int
    micro_batch_tokens: int  # stage 5's second update: micro-batches of this many tokens
    sampler_prompts: int  # stage 6: prompts x sampler_group completions (128 rows on the H200)
    sampler_group: int
    sampler_new_tokens: int
    train_new_tokens: int  # stage 8


H200_SIZES = Sizes("qwen2.5-0.5b", "qwen2.5-7b", (2, 4), 28, 2048, 8192, 4096, "qwen2.5-0.5b,qwen2.5-7b", 3,
                   (4, 4, 300, 200), 8, 8, 256, 2048, 16, 8, 256, 64)
TINY_SIZES = Sizes("tiny", "tiny-untied", (1, 2), 4, 32, 512, 32, "tiny", 1, (2, 3, 24, 8), 1, 2, 4, 24, 1, 2,
                   4, 8)


@dataclass
class Context:
    """What the stages share: where to write, the sizes, and stage 0's ceilings (for fractions)."""
    device: torch.device
    sizes: Sizes
    out: Path
    tiny: bool
    ceilings: dict = field(default_factory=dict)  # gemm_tflops, copy_gbs
    failures: list[str] = field(default_factory=list)  # the running stage's failed checks

    def check(self, ok: bool, what: str) -> bool:
        """Record a failed check without stopping the stage: its other figures are still reported."""
        if not ok:
            self.failures.append(what)
        return ok

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class MemoryPeak:
    """Peak memory of a region: CUDA's allocator on GPU; on CPU the resident-set high-water mark (VmHWM), reset
    through /proc/self/clear_refs as eval.bench kernels does."""

    def __init__(self, device: torch.device):
        self.device = device

    def _status_kib(self, name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{name} missing from /proc/self/status")

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status_kib("VmRSS") * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_kib("VmHWM") * 1024

    def total(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _random_sequences(n_prompts: int, group: int, prompt_len: int, max_completion: int, vocab: int, seed: int = 0):
    """GRPO-shaped inputs: each prompt repeated for its group, completions of different lengths (1..max)."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n_prompts):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(group):
            n = int(torch.randint(1, max_completion + 1, (1,), generator=g))
            prompts.append(prompt)
            completions.append(torch.randint(0, vocab, (n,), generator=g).tolist())
    return prompts, completions


def _rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _step_settings(sizes: Sizes, micro_batch_tokens: int = 0, kl_coef: float = 0.001):
    """The Config fields of train.py that the rl functions read, at the paper's GPU settings (train.py cannot be
    imported from eval/: it is the top layer)."""
    from data.calls import PromptFormat
    return SimpleNamespace(
        seed=0, prompt_format=PromptFormat("think", "json", ""), prompts_per_step=sizes.step_prompts,
        group_size=sizes.step_group, max_new_tokens=sizes.step_new_tokens, temperature=0.7, top_p=1.0, top_k=0,
        sampler_token_budget=65536, reward_mode="binary", dynamic_sampling=False, max_refill_rounds=0,
        micro_batch_tokens=micro_batch_tokens, ppo_epochs=1, minibatches=1, eps_low=0.2, eps_high=0.2,
        kl_coef=kl_coef, entropy_coef=0.4, entropy_kappa=2.0, entropy_mode="seq", loss_agg="token_mean",
        std_norm=True, grad_clip=1.0, fsdp=False, tis_cap=2.0, chunk_backward=True)


def _random_advantages(batch, group: int, seed: int = 0) -> torch.Tensor:
    """A random model never answers right, so every reward is 0 and every advantage 0; random rewards stand in
    so that the update's gradients are those of a real step."""
    from rl.grpo import group_advantages
    rewards = torch.randint(0, 2, (len(batch),), generator=torch.Generator().manual_seed(seed)).float()
    return group_advantages(rewards, group)


# ---------------------------------------------------------------------------------------------------------------
# stages


def stage_environment(ctx: Context) -> dict:
    """Versions, the device, the paths the trainer would take, and this machine's own ceilings."""
    import platform

    import transformers

    from model.kernels import triton_available
    from model.score import describe_paths
    from model.tiny import qwen_shaped_model

    device = ctx.device
    figures = {"python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "cuda": torch.version.cuda,
               "triton": __import__("triton").__version__ if triton_available() else None}
    try:
        import flash_attn
        figures["flash_attn"] = flash_attn.__version__
    except ImportError:
        figures["flash_attn"] = None
    if ctx.cuda:
        props = torch.cuda.get_device_properties(device)
        figures.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    else:
        figures.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    from model.load import pick_attn_implementation
    probe = qwen_shaped_model(ctx.sizes.small_shape, dtype=torch.float32, device=device, layers=1,
                              attn=pick_attn_implementation(device))
    figures["paths"] = describe_paths(probe, ctx.compute_dtype)
    del probe

    n = ctx.sizes.gemm_n
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random, never zeros
    gemm_s = _median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    figures["gemm"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"
    figures["gemm_tflops"] = round(2 * n**3 / gemm_s / 1e12, 3)
    src = torch.randn(ctx.sizes.copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    figures["copy_mib"] = ctx.sizes.copy_mib
    figures["copy_gbs"] = round(2 * src.numel() * 4 / copy_s / 1e9, 1)  # bytes read + bytes written
    ctx.check(torch.equal(dst, src), "the copy did not reproduce its source")
    ctx.ceilings.update(gemm_tflops=figures["gemm_tflops"], copy_gbs=figures["copy_gbs"])
    figures["summary"] = f"{figures['gemm_tflops']} TFLOP/s, {figures['copy_gbs']} GB/s"
    return figures


def _tests_needing_cuda() -> list[dict]:
    """Every test function in tests/ that runs something on CUDA (.cuda(), .to("cuda"...), device="cuda"), or
    that skips without CUDA, with its markers and skip reasons, read from the source (nothing is imported)."""
    import ast

    def is_cuda(node) -> bool:
        return isinstance(node, ast.Constant) and node.value == "cuda"

    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            uses = False
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call):
                    fn = sub.func
                    if isinstance(fn, ast.Attribute) and fn.attr == "cuda" and not sub.args:
                        uses = True  # model.cuda()
                    if isinstance(fn, ast.Attribute) and fn.attr == "to" and sub.args and is_cuda(sub.args[0]):
                        uses = True
                    if any(k.arg == "device" and is_cuda(k.value) for k in sub.keywords):
                        uses = True
            markers, reasons, skips_without_cuda = set(), [], False
            for dec in node.decorator_list:
                text = ast.unparse(dec)
                if text.startswith("pytest.mark."):
                    markers.add(text.removeprefix("pytest.mark.").split("(")[0])
                if text.startswith("pytest.mark.skipif") and "cuda.is_available" in text:
                    skips_without_cuda = True
                    reasons += [k.value.value for k in dec.keywords if k.arg == "reason"]
            if uses or skips_without_cuda or "gpu" in markers:
                found.append({"test": f"{path.name}::{node.name}", "markers": sorted(markers),
                              "skips_without_cuda": skips_without_cuda, "reasons": reasons, "file": str(path)})
    return found


def _run_pytest(args: list[str], env: dict | None = None, timeout: int = 900) -> dict:
    """Run pytest in a subprocess and read its JUnit XML: counts and every skip reason."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               *args], cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                              timeout=timeout)
        counts = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": [], "returncode": proc.returncode,
                  "tail": (proc.stdout + proc.stderr)[-1500:]}
        if not xml.exists():
            return counts
        for case in ET.parse(xml).iter("testcase"):
            outcome = [child for child in case if child.tag in ("failure", "error", "skipped")]
            if not outcome:
                counts["passed"] += 1
            elif outcome[0].tag == "skipped":
                counts["skipped"] += 1
                counts["skip_reasons"].append(outcome[0].get("message", ""))
            else:
                counts["failed"] += 1
    return counts


def stage_gpu_tests(ctx: Context) -> dict:
    """pytest -m gpu on the files that hold CUDA tests. On CUDA every test must pass, or skip only because
    flash-attn is not installed. On CPU the CUDA tests cannot run: instead every test that needs CUDA must carry
    the gpu marker and a skip on CUDA's absence with a reason, they must all skip cleanly with it, and the Triton
    kernel tests run under the Triton interpreter."""
    cuda_tests = _tests_needing_cuda()
    unmarked = [t["test"] for t in cuda_tests if "gpu" not in t["markers"]]
    no_skip = [t["test"] for t in cuda_tests if not (t["skips_without_cuda"] and t["reasons"])]
    ctx.check(not unmarked, f"tests using CUDA without the gpu marker: {', '.join(unmarked)}")
    ctx.check(not no_skip, f"CUDA tests without a skip-if-no-CUDA carrying a reason: {', '.join(no_skip)}")
    files = sorted({t["file"] for t in cuda_tests})
    interpreter_test = "tests/test_kernels.py::test_triton_interpreter_matches_float64"
    if ctx.cuda:
        run = _run_pytest(["-m", "gpu", "-rs", *files])
    else:  # one pytest run: the CUDA tests (which must skip) and the Triton kernel tests under the interpreter
        run = _run_pytest(["-rs", *[f"{t['file']}::{t['test'].split('::')[1]}" for t in cuda_tests], interpreter_test],
                          env={"TRITON_INTERPRET": "1"})
    figures = {"cuda_tests_found": len(cuda_tests), "files": [Path(f).name for f in files],
               "unmarked": unmarked, "passed": run["passed"], "failed": run["failed"], "skipped": run["skipped"]}
    ctx.check(run["returncode"] in (0, 5) and run["failed"] == 0, f"pytest -m gpu failed:\n{run['tail']}")
    if ctx.cuda:
        bad = [r for r in run["skip_reasons"] if "flash-attn not installed" not in r]
        figures["skip_reasons"] = sorted(set(run["skip_reasons"]))
        ctx.check(not bad, f"skipped for another reason than a missing flash-attn: {sorted(set(bad))}")
        ctx.check(run["passed"] > 0, "no CUDA test passed")
        figures["summary"] = f"{run['passed']} passed, {run['skipped']} skipped"
        return figures
    # CPU: every CUDA test skips and says why; the one test that runs is the interpreter's
    ctx.check(run["passed"] == 1, f"the Triton kernel tests under TRITON_INTERPRET=1 did not pass:\n{run['tail']}")
    ctx.check(run["skipped"] >= len(cuda_tests), f"only {run['skipped']} CUDA tests skipped on CPU")
    allowed = ("needs a CUDA GPU", "flash-attn not installed")
    ctx.check(all(r.startswith(allowed) for r in run["skip_reasons"]),
              f"a CUDA test skipped for another reason: {sorted(set(run['skip_reasons']))}")
    figures.update(skip_reasons=sorted(set(run["skip_reasons"])), triton_interpreter_passed=run["passed"])
    figures["summary"] = (f"{len(cuda_tests)} CUDA tests marked, {run['skipped']} skipped on CPU; Triton interpreter "
                          f"tests {run['passed']} passed")
    return figures


def stage_head_kernel(ctx: Context) -> dict:
    """The head at the 7B shape (H = 3584, 151,665 real rows of 151,936, temperature 0.7) against float64: the
    log-probs and entropies, the gradients of hidden states and head, and exactly zero gradient on the padded
    head rows the real vocabulary never uses."""
    from model.kernels import logprob_entropy, pick_backend
    from model.tiny import QWEN25_SHAPES, QWEN_USABLE_IDS, QWEN_VOCAB

    device, dtype = ctx.device, ctx.compute_dtype
    n, v, temperature = ctx.sizes.head_tokens, QWEN_USABLE_IDS, 0.7
    h = QWEN25_SHAPES[ctx.sizes.big_shape]["hidden_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 2).to(device, dtype).requires_grad_()  # logits of a few units
    head = (torch.randn(QWEN_VOCAB, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)  # d loss / d logp: every token weighted differently
    logp, entropy = logprob_entropy(hidden, head[:v], targets, temperature=temperature)
    (logp * upstream).sum().backward()

    h64, w64 = hidden.detach().double().requires_grad_(), head.detach().double().requires_grad_()
    z = (h64 @ w64[:v].T) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    ref_logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    (ref_logp * upstream.double()).sum().backward()
    figures = {"backend": pick_backend("auto", device), "N": n, "H": h, "V": v, "head_rows": QWEN_VOCAB,
               "dtype": str(dtype).removeprefix("torch."), "temperature": temperature,
               "logp_rel_err": _rel_error(logp.detach(), ref_logp.detach()),
               "logp_max_abs_err": (logp.detach().double() - ref_logp.detach()).abs().max().item(),
               "entropy_rel_err": _rel_error(entropy, ref_entropy),
               "grad_hidden_rel_err": _rel_error(hidden.grad, h64.grad),
               "grad_head_rel_err": _rel_error(head.grad[:v], w64.grad[:v]),
               "padded_rows_grad_max": head.grad[v:].abs().max().item()}
    # bf16 operands: relative errors of 1e-3..1e-2 are the format's; fp32: far below
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for key in ("logp_rel_err", "entropy_rel_err", "grad_hidden_rel_err", "grad_head_rel_err"):
        ctx.check(figures[key] < tol, f"{key} {figures[key]:.3g} >= {tol}")
    ctx.check(figures["padded_rows_grad_max"] == 0.0, "padded head rows got a gradient")
    ctx.check(bool(torch.isfinite(logp).all() and torch.isfinite(entropy).all()), "non-finite log-probs")
    figures["summary"] = (f"{figures['backend']}: logp {figures['logp_rel_err']:.1e}, grads "
                          f"{max(figures['grad_hidden_rel_err'], figures['grad_head_rel_err']):.1e} rel")
    return figures


def stage_kernel_bench(ctx: Context) -> dict:
    """eval.bench kernels: fused vs naive vs the bare lm_head matmul, with TFLOP/s as a fraction of stage 0's
    GEMM ceiling (forward + backward counted as 3 products of 2NHV, the naive variant's work)."""
    from eval.bench import bench_kernels

    result = bench_kernels(["--device", str(ctx.device), "--shapes", ctx.sizes.kernel_shapes,
                            "--repeats", str(ctx.sizes.kernel_repeats), "--temperature", "0.7"])
    ceiling = ctx.ceilings.get("gemm_tflops")
    rows = []
    for r in result["results"]:
        tflops = 6 * r["N"] * r["H"] * r["V"] / (r["fwd_bwd_ms"] / 1e3) / 1e12
        row = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}
        row["tflops"] = round(tflops, 3)
        row["fraction_of_gemm_ceiling"] = round(tflops / ceiling, 3) if ceiling else None
        rows.append(row)
    fused = [r for r in rows if r["variant"] in ("triton", "chunked")]
    for r in fused:
        ctx.check(r.get("mem_saving_x", 0) > 1, f"{r['shape']} {r['variant']} uses no less memory than naive")
    if ctx.cuda:
        ctx.check(any(r["variant"] == "triton" for r in rows), "the Triton variant did not run on CUDA")
    best = {r["shape"]: r for r in sorted(fused, key=lambda r: -r["tflops"])}
    return {"results": rows, "summary": ", ".join(
        f"{s} {r['variant']} {r['fwd_bwd_ms']:.3g} ms ({r['mem_saving_x']:.3g}x less memory)" for s, r in best.items())}


def stage_scoring(ctx: Context) -> dict:
    """At 0.5B: the padded, packed and shared-prompt log-probs. In fp32 all three must agree with the padded
    fp32 forward; in the compute dtype (bf16 on CUDA) their distance to it is measured. Then one AdamW step at
    lr 1e-6 through the mixed-precision scorer must move the fp32 master weights."""
    from model.load import autocast_to
    from model.score import PolicyScorer, completion_logprobs
    from model.tiny import QWEN_USABLE_IDS, qwen_shaped_model

    device, cdtype = ctx.device, torch.bfloat16  # bf16 on CPU too: autocast works there
    policy = qwen_shaped_model(ctx.sizes.small_shape, dtype=torch.float32, device=device)
    prompts, completions = _random_sequences(*ctx.sizes.score_prompts, vocab=QWEN_USABLE_IDS)
    kw = dict(temperature=0.7, with_entropy=True)
    figures = {"sequences": len(prompts), "completion_tokens": sum(map(len, completions))}
    with torch.no_grad():
        reference, _, _ = PolicyScorer(policy, QWEN_USABLE_IDS, False, torch.float32)(prompts, completions, **kw)
        for dtype in (torch.float32, cdtype):
            name = str(dtype).removeprefix("torch.")
            padded = PolicyScorer(policy, QWEN_USABLE_IDS, False, dtype)(prompts, completions, **kw)[0]
            shared = PolicyScorer(policy, QWEN_USABLE_IDS, True, dtype)(prompts, completions, grouped=True, **kw)[0]
            with autocast_to(dtype, device):
                packed = completion_logprobs(policy, prompts, completions, pack=True, vocab_size=QWEN_USABLE_IDS,
                                             **kw)[0]
            for path, logp in (("padded", padded), ("packed", packed), ("shared_prompt", shared)):
                diff = (logp.float() - reference).abs()
                figures[f"{path}_{name}_max_abs_diff"] = diff.max().item()
                figures[f"{path}_{name}_mean_abs_diff"] = diff.mean().item()
    for path in ("padded", "packed", "shared_prompt"):
        ctx.check(figures[f"{path}_float32_max_abs_diff"] < 2e-3, f"{path} fp32 log-probs differ from padded fp32")
        ctx.check(figures[f"{path}_bfloat16_mean_abs_diff"] < 0.1, f"{path} bf16 log-probs far from fp32")

    # mixed precision: bf16 compute, fp32 masters; at lr 1e-6 a bf16 weight would mostly not move at all
    scorer = PolicyScorer(policy, QWEN_USABLE_IDS, True, cdtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    before = [p.detach().clone() for p in policy.parameters()]
    policy.train()
    logp, _, _ = scorer(prompts, completions, temperature=0.7, grouped=True)
    (-logp.mean()).backward()
    optimizer.step()
    moved = moved_bf16 = total = 0
    for p, p0 in zip(policy.parameters(), before):
        moved += (p.detach() != p0).sum().item()
        moved_bf16 += (p.detach().to(torch.bfloat16) != p0.to(torch.bfloat16)).sum().item()
        total += p.numel()
    figures["master_weights_moved_fraction"] = moved / total
    figures["bf16_weights_would_move_fraction"] = moved_bf16 / total
    ctx.check(moved / total > 0.5, f"lr 1e-6 moved only {moved / total:.1%} of the fp32 master weights")
    figures["summary"] = (f"bf16 vs fp32 mean |dlogp| padded {figures['padded_bfloat16_mean_abs_diff']:.2g}, packed "
                          f"{figures['packed_bfloat16_mean_abs_diff']:.2g}; masters moved {moved / total:.0%} "
                          f"(bf16 weights would: {moved_bf16 / total:.0%})")
    return figures


def _grpo_step(ctx: Context, shape: str, layers: int | None) -> dict:
    """One GRPO step with the trainer's own functions (rollouts, scoring, update) on a random model of `shape`
    (fp32 masters, bf16 compute on CUDA, a frozen reference in the compute dtype), then a second update in
    micro-batches that measures the memory per micro-batch token."""
    from data.default import load_default
    from model.load import autocast_to
    from model.score import PolicyScorer
    from model.tiny import QWEN_USABLE_IDS, qwen_shaped_model, qwen_stub_tokenizer
    from rl.dist import Dist
    from rl.rollout import PromptCursor, collect_rollouts
    from rl.update import score_rollouts, update_policy

    device, cdtype, sizes = ctx.device, ctx.compute_dtype, ctx.sizes
    memory = MemoryPeak(device)
    tokenizer = qwen_stub_tokenizer()
    policy = qwen_shaped_model(shape, dtype=torch.float32, device=device, layers=layers)
    reference = copy.deepcopy(policy).to(cdtype).eval().requires_grad_(False)
    cfg, d = _step_settings(sizes), Dist()
    scorer = PolicyScorer(policy, QWEN_USABLE_IDS, True, cdtype)
    reference_scorer = PolicyScorer(reference, QWEN_USABLE_IDS, True, cdtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.99))
    cursor = PromptCursor(load_default("train"), cfg.seed)
    memory.reset()
    times = {}
    t0 = time.perf_counter()
    policy.eval()
    with torch.no_grad(), autocast_to(cdtype, device):
        batch = collect_rollouts(policy, tokenizer, cursor, 0, cfg, d)
    _sync(device)
    times["sample_s"] = time.perf_counter() - t0
    advantages = _random_advantages(batch, cfg.group_size)
    t0 = time.perf_counter()
    scored = score_rollouts(scorer, reference_scorer, batch, tokenizer, cfg, d)
    _sync(device)
    times["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.train()
    stats = update_policy(scorer, policy, optimizer, batch, scored, advantages, 0, cfg, d, log=lambda msg: None)
    _sync(device)
    times["update_s"] = time.perf_counter() - t0
    peak = memory.peak()
    # second update in micro-batches: memory above the resting state per micro-batch token
    mb_cfg = _step_settings(sizes, micro_batch_tokens=sizes.micro_batch_tokens)
    resting = memory.current()
    memory.reset()
    update_policy(scorer, policy, optimizer, batch, scored, advantages, 1, mb_cfg, d, log=lambda msg: None)
    seq_tokens = [len(p) + len(c) for p, c in zip(batch.prompts, batch.completions)]
    largest_micro = max(sizes.micro_batch_tokens, max(seq_tokens))  # a longer sequence goes alone
    per_token = max(memory.peak() - resting, 1) / largest_micro
    # the memory model of eval.memory (python -m eval.memory's table) for the same shape, to compare
    from eval.memory import _config, activation_bytes_per_token
    from model.tiny import QWEN25_SHAPES
    model_config = _config({**QWEN25_SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    per_token_model = activation_bytes_per_token(model_config, cdtype, False)["per_token"]
    out = {**times, "peak_gib": peak / 2**30, "resting_gib": resting / 2**30, "bytes_per_micro_token": per_token,
           "bytes_per_micro_token_model": per_token_model,
           "micro_batch_tokens_fit_est": int((0.9 * memory.total() - resting) / per_token),
           "sequences": len(batch), "prompt_tokens_mean": statistics.mean(len(p) for p in batch.prompts),
           "completion_tokens": sum(len(c) for c in batch.completions),
           "logp_gap_mean": stats["logp_gap_mean"], "logp_gap_max": stats["logp_gap_max"],
           "updates": stats["updates"], "grad_norm": stats["grad_norm"]}
    ctx.check(stats["updates"] == 1 and stats["skipped"] == 0, f"{shape}: the update was skipped")
    # the sampler and the trainer score the same distribution: in fp32 they agree to rounding, in bf16 roughly
    gap_tol = 0.5 if cdtype == torch.bfloat16 else 1e-3
    ctx.check(stats["logp_gap_max"] < gap_tol, f"{shape}: sampler-trainer log-prob gap {stats['logp_gap_max']:.3g}")
    del policy, reference, scorer, reference_scorer, optimizer
    return out


def stage_grpo_step(ctx: Context) -> dict:
    """At 0.5B, and at the 7B width truncated to two depths whose difference gives the cost of one layer: the
    full 28-layer figures are the shallower run plus the per-layer cost times the missing layers (the full 7B
    with its reference does not fit one GPU without FSDP across several)."""
    sizes = ctx.sizes
    small = _grpo_step(ctx, sizes.small_shape, None)
    _free(ctx)
    (l1, l2), full = sizes.big_layers, sizes.big_full_layers
    shallow = _grpo_step(ctx, sizes.big_shape, l1)
    _free(ctx)
    deep = _grpo_step(ctx, sizes.big_shape, l2)
    scaled = {}
    for key in ("sample_s", "score_s", "update_s", "peak_gib"):
        per_layer = max(0.0, deep[key] - shallow[key]) / (l2 - l1)  # timing noise can make it negative
        scaled[key] = shallow[key] + per_layer * (full - l1)
    figures = {"small": {"shape": sizes.small_shape, **small},
               "big_truncated": {"shape": sizes.big_shape, "layers": [l1, l2], "shallow": shallow, "deep": deep},
               "big_scaled_to_full": {"layers": full, **scaled}}
    figures["summary"] = (f"{sizes.small_shape}: {small['sample_s']:.1f}+{small['score_s']:.1f}+"
                          f"{small['update_s']:.1f} s, {small['peak_gib']:.1f} GiB; {sizes.big_shape} x{full} "
                          f"scaled: {scaled['sample_s']:.1f}+{scaled['score_s']:.1f}+{scaled['update_s']:.1f} s, "
                          f"{scaled['peak_gib']:.1f} GiB")
    return figures


def stage_sampler(ctx: Context) -> dict:
    """eval.bench sampler on random 0.5B- and 7B-shaped models with the tokenizer stub, on the default data's
    prompts: the trainer's configuration (a seed per completion, log-probs) vs plain batched generate, and the
    static cache + compile (its first call's seconds include compiling; on CPU transformers runs the static cache
    without compiling), as tokens/s and as a fraction of the bound at stage 0's GB/s."""
    from eval.bench import bench_sampler

    sizes = ctx.sizes
    result = {}
    for name, shape in (("small", sizes.small_shape), ("big", sizes.big_shape)):
        argv = ["--device", str(ctx.device), "--random", "--shape", shape, "--prompts", str(sizes.sampler_prompts),
                "--group-size", str(sizes.sampler_group), "--new-tokens", str(sizes.sampler_new_tokens),
                "--rounds", "1", "--skip-naive", "--skip-ablations", "--static", "on" if name == "small" else "off",
                "--rollout-dtype", str(ctx.compute_dtype).removeprefix("torch.")]  # on CPU too: the GPU's methods
        if ctx.ceilings.get("copy_gbs"):
            argv += ["--bandwidth-gbs", str(ctx.ceilings["copy_gbs"])]
        figures = bench_sampler(argv)
        ctx.check(figures.get("sampler_trainer_tok_per_s", 0) > 0, f"{shape}: the sampler produced nothing")
        result[name] = {k: v for k, v in figures.items() if k != "prompt_tokens"}
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    ctx.check("sampler_trainer_static_tok_per_s" in result["small"], "the static-cache sampler did not run")
    result["sampler_trainer_tok_per_s"] = result["small"]["sampler_trainer_tok_per_s"]
    result["sampler_trainer_static_tok_per_s"] = result["small"]["sampler_trainer_static_tok_per_s"]
    result["summary"] = "; ".join(
        f"{shape}: " + ", ".join(f"{k.removesuffix('_tok_per_s')} {result[n][k]:.4g} tok/s"
                                 for k in result[n] if k.endswith("tok_per_s"))
        for n, shape in (("small", sizes.small_shape), ("big", sizes.big_shape)))
    return result


def stage_fsdp(ctx: Context) -> dict:
    """FSDP2 with one rank, through the trainer's own wrapping (NCCL for CUDA tensors, gloo for CPU ones): the
    rollouts sampled on gathered parameters and the updated parameters equal those of the unsharded step, and
    every collective the trainer issues works on this process group."""
    import torch.distributed as dist

    from data.default import load_default
    from model.score import PolicyScorer
    from model.tiny import QWEN_USABLE_IDS, qwen_shaped_model, qwen_stub_tokenizer
    from rl.dist import finite_on_all_ranks, full_params, init_distributed, process_group_backend, wrap_for_training
    from rl.rollout import PromptCursor, collect_rollouts
    from rl.update import score_rollouts, update_policy

    device = ctx.device
    if dist.is_initialized():
        dist.destroy_process_group()
    d = init_distributed(device, fsdp=True)
    figures = {"backend": process_group_backend(device)}
    try:
        tokenizer = qwen_stub_tokenizer()
        sharded = qwen_shaped_model(ctx.sizes.small_shape, dtype=torch.float32, device=device, layers=2)
        plain = copy.deepcopy(sharded)
        cfg = _step_settings(ctx.sizes, kl_coef=0.0)
        records = load_default("train")
        steps = {}
        for name, policy, fsdp in (("fsdp", sharded, True), ("plain", plain, False)):
            # the same scoring path on both sides (FSDP cannot share a prompt's forward), so only sharding differs
            scorer = PolicyScorer(policy, QWEN_USABLE_IDS, False, torch.float32)
            train_module = wrap_for_training(scorer, policy, fsdp, d, device)
            cfg.fsdp = fsdp
            policy.eval()
            with torch.no_grad(), full_params(scorer, fsdp):
                batch = collect_rollouts(policy, tokenizer, PromptCursor(records, 0), 0, cfg, d)
            scored = score_rollouts(scorer, None, batch, tokenizer, cfg, d)
            # plain SGD: the step is the gradient itself (Adam's first step is lr * sign(g), which would hide
            # gradient differences and flip on gradients near zero)
            optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
            policy.train()
            advantages = _random_advantages(batch, cfg.group_size)
            stats = update_policy(train_module, policy, optimizer, batch, scored, advantages, 0, cfg, d,
                                  log=lambda msg: None)
            params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu()
                      for k, v in policy.state_dict().items()}
            steps[name] = (batch.completions, params, stats)
        same_rollouts = steps["fsdp"][0] == steps["plain"][0]
        diff = max((steps["fsdp"][1][k] - steps["plain"][1][k]).abs().max().item() for k in steps["plain"][1])
        figures.update(same_rollouts=same_rollouts, param_max_abs_diff=diff,
                       grad_norm_fsdp=steps["fsdp"][2]["grad_norm"], grad_norm_plain=steps["plain"][2]["grad_norm"])
        ctx.check(same_rollouts, "rollouts on gathered FSDP parameters differ from the unsharded model's")
        ctx.check(diff < 1e-5, f"FSDP2 step differs from the unsharded step by {diff:.3g}")
        ctx.check(steps["fsdp"][2]["updates"] == 1, "the FSDP2 update was skipped")

        # every collective the trainer uses, on the tensors it uses them with (CPU counts, device tensors)
        works = {}
        for where in ["cpu"] + (["cuda"] if ctx.cuda else []):
            t = torch.ones(4, device=where)
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX):
                dist.all_reduce(t, op=op)
            works[f"all_reduce_{where}"] = torch.equal(t.cpu(), torch.ones(4))
            out = torch.empty(4, device=where)
            dist.all_gather_into_tensor(out, t)
            works[f"all_gather_{where}"] = torch.equal(out.cpu(), torch.ones(4))
            dist.reduce_scatter_tensor(out, t)
            works[f"reduce_scatter_{where}"] = torch.equal(out.cpu(), torch.ones(4))
            dist.broadcast(t, src=0)
            works[f"broadcast_{where}"] = True
            works[f"finite_on_all_ranks_{where}"] = finite_on_all_ranks(t)
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0})
        works["all_gather_object"] = gathered == [{"rank": 0}]
        dist.barrier()
        works["barrier"] = True
        figures["collectives"] = works
        ctx.check(all(works.values()), f"collectives failed: {[k for k, v in works.items() if not v]}")
    finally:
        d.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    figures["summary"] = (f"{figures['backend']}: step diff {figures.get('param_max_abs_diff', float('nan')):.1e}, "
                          f"{sum(figures.get('collectives', {}).values())}/{len(figures.get('collectives', {}))} "
                          "collectives")
    return figures


def stage_train_e2e(ctx: Context) -> dict:
    """train.py as a user runs it, on a random 0.5B model saved with the tokenizer stub: warm-up, 2 RL steps,
    evaluation, checkpoint; then the checkpoint loads with from_pretrained and holds the trained weights."""
    from transformers import AutoModelForCausalLM

    from eval.bench import _train_subprocess
    from model.checkpoint import latest_checkpoint
    from model.tiny import qwen_shaped_model, qwen_stub_tokenizer

    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        model_dir, run_dir = Path(tmp) / "model", Path(tmp) / "run"
        model = qwen_shaped_model(ctx.sizes.small_shape, dtype=ctx.compute_dtype, device="cpu")
        model.save_pretrained(model_dir)
        qwen_stub_tokenizer().save_pretrained(model_dir)
        del model
        t0 = time.perf_counter()
        new = str(ctx.sizes.train_new_tokens)
        rows = _train_subprocess(["--model", str(model_dir), "--device", ctx.device.type, "--sft-steps", "1",
                                  "--sft-batch-size", "4", "--steps", "2", "--prompts-per-step",
                                  str(ctx.sizes.step_prompts), "--group-size", str(ctx.sizes.step_group),
                                  "--max-new-tokens", new, "--eval-limit", "2",
                                  "--save-every", "0", "--sample-every", "1", "--tools-as", "json", "--prefill", "",
                                  "--lr", "1e-6"], str(run_dir))
        wall = time.perf_counter() - t0
        rl = [r for r in rows if r.get("phase") == "rl"]
        checkpoint = latest_checkpoint(run_dir)
        ctx.check(len(rl) == 2, f"{len(rl)} RL steps logged, expected 2")
        ctx.check(checkpoint is not None, "no complete checkpoint was written")
        figures = {"wall_s": wall, "rl_steps": len(rl), "checkpoint": checkpoint.name if checkpoint else None,
                   "step_s": [round(r["time_step"], 2) for r in rl], "peak_mem_gb": max(r["peak_mem_gb"] for r in rl),
                   "evaluations": sorted(k for r in rows if r.get("phase") == "summary" for k in r if "eval/" in k)}
        if checkpoint is not None:
            # the warm-up trained the random model, so the checkpoint must differ from it; a random model earns no
            # reward, so RL moved the weights only through the KL term (not at all when policy and reference
            # compute in the same precision): reported, not required
            loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
            warm = AutoModelForCausalLM.from_pretrained(run_dir / "warmup", dtype=torch.float32)
            initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            head_rows = loaded.get_output_embeddings().weight.shape[0]
            figures.update(head_rows=head_rows, rewards=[r["reward"] for r in rl],
                           checkpoint_equals_warmup=all(torch.equal(a, b) for a, b in
                                                        zip(loaded.parameters(), warm.parameters())),
                           checkpoint_differs_from_initial=any(not torch.equal(a, b) for a, b in
                                                               zip(loaded.parameters(), initial.parameters())))
            ctx.check(head_rows == 151936, f"the checkpoint's head has {head_rows} rows")
            ctx.check(figures["checkpoint_differs_from_initial"], "the checkpoint holds the initial weights")
        ctx.check(len(figures["evaluations"]) >= 2, "the evaluations are missing from the summary")
    figures["summary"] = (f"{wall:.0f} s, steps {figures['step_s']} s, checkpoint {figures['checkpoint']} "
                          "loads with from_pretrained")
    return figures


@dataclass(frozen=True)
class Stage:
    name: str
    h200_estimate_s: float  # on one H200, including model builds and compilation (an estimate until measured)
    tiny_estimate_s: float  # --device cpu --tiny on a 2-core CPU
    run: object  # Context -> figures


STAGES = [
    Stage("environment", 10, 3, stage_environment),
    Stage("gpu-tests", 45, 20, stage_gpu_tests),
    Stage("head-kernel", 15, 2, stage_head_kernel),
    Stage("kernel-bench", 40, 10, stage_kernel_bench),
    Stage("scoring", 20, 3, stage_scoring),
    Stage("grpo-step", 75, 8, stage_grpo_step),
    Stage("sampler", 120, 5, stage_sampler),
    Stage("fsdp", 20, 5, stage_fsdp),
    Stage("train-e2e", 40, 25, stage_train_e2e),
]


def default_budget_s(tiny: bool) -> float:
    """--budget's default on a GPU: every stage's estimate plus a tenth (385 s -> 424 s), so that an estimate a
    little low does not cut a whole run short. With --tiny 600 s: the shared 2-core CPU's times vary far more."""
    if tiny:
        return 600.0
    return round(1.1 * sum(s.h200_estimate_s for s in STAGES))


# ---------------------------------------------------------------------------------------------------------------
# driver


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _append(path: Path, row: dict) -> None:
    """One line per stage, flushed to disk before the next stage starts: a killed run leaves a valid file."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _parse_stages(text: str | None) -> list[int]:
    if not text:
        return list(range(len(STAGES)))
    names = {s.name: i for i, s in enumerate(STAGES)}
    out = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < len(STAGES):
            out.append(int(part))
        elif part in names:
            out.append(names[part])
        else:
            raise SystemExit(f"unknown stage {part!r}: use numbers 0-{len(STAGES) - 1} or names "
                             f"({', '.join(names)})")
    return sorted(set(out))


def _previous_ceilings(report: Path) -> dict:
    """Stage 0's ceilings from an earlier run into the same report, for a rerun of later stages alone."""
    if not report.exists():
        return {}
    ceilings = {}
    for line in report.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("name") == "environment" and row.get("ok"):
            ceilings = {k: row["figures"][k] for k in ("gemm_tflops", "copy_gbs")}
    return ceilings


def run_check(out: Path, budget_s: float, stages: list[int], device: torch.device, tiny: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.jsonl"
    ctx = Context(device=device, sizes=TINY_SIZES if tiny else H200_SIZES, out=out, tiny=tiny,
                  ceilings=_previous_ceilings(report))
    start, rows = time.perf_counter(), []
    for i in stages:
        stage = STAGES[i]
        estimate = stage.tiny_estimate_s if tiny else stage.h200_estimate_s
        left = budget_s - (time.perf_counter() - start)
        row = {"stage": i, "name": stage.name, "device": str(device), "tiny": tiny, "estimate_s": estimate,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if estimate > left:
            row.update(ok=None, skipped=f"{left:.0f} s of the budget left, the estimate is {estimate:.0f} s",
                       seconds=0.0, figures={}, error=None)
        else:
            print(f"[gpucheck] stage {i} {stage.name} (estimate {estimate:.0f} s)", flush=True)
            ctx.failures = []
            t0 = time.perf_counter()
            figures, error = {}, None
            try:
                figures = stage.run(ctx)
            except Exception as e:  # a stage's crash is its report, not the end of the check
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            seconds = time.perf_counter() - t0
            if ctx.failures:
                error = "; ".join(ctx.failures) + (f"\n{error}" if error else "")
            row.update(ok=error is None, skipped=None, seconds=round(seconds, 2), figures=figures, error=error)
            _free(ctx)
        _append(report, row)
        rows.append(row)
    print_summary(rows)
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\nstage  name          result  seconds  estimate  figures")
    for r in rows:
        result = "skip" if r["skipped"] else ("ok" if r["ok"] else "FAIL")
        what = r["skipped"] or (r["figures"].get("summary", "") if r["ok"] else (r["error"] or "").splitlines()[0])
        print(f"{r['stage']:<6} {r['name']:<13} {result:<7} {r['seconds']:>7.1f}  {r['estimate_s']:>8.0f}  {what}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.gpucheck", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[-1])
    ap.add_argument("--out", required=True, help="report directory (report.jsonl is appended to)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: a stage whose estimate does not fit in what is left is skipped (default: the "
                         "stages' estimates plus a tenth, 424 on a GPU; 600 with --tiny)")
    ap.add_argument("--stages", default=None, help="comma list of stage numbers or names (default: all)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (for CPU runs of the same logic)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device: run on a GPU machine, or --device cpu --tiny")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("the full-size check needs a GPU: on CPU pass --tiny (toy sizes of the same stages)")
    budget = args.budget if args.budget is not None else default_budget_s(args.tiny)
    rows = run_check(Path(args.out), budget, _parse_stages(args.stages), device, args.tiny)
    raise SystemExit(0 if all(r["ok"] for r in rows if not r["skipped"]) else 1)


if __name__ == "__main__":
    main()
