"""logprob_entropy against a float64 reference: values, entropies, gradients for hidden and weight.

Shapes are deliberately not multiples of any chunk or tile (N=37 rows, V=301 vocab), temperature != 1 is
covered, and so are logits of large magnitude that are all negative. The Triton kernels run here under the
Triton interpreter (in a subprocess, since TRITON_INTERPRET must be set before triton is imported) and on the
GPU when there is one.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from model.kernels import logprob_entropy, naive_logprob_entropy, pick_backend
from tiny_run import assert_grad_close

N, H, V = 37, 48, 301
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def make_inputs(n, h, v, dtype, kind, device="cpu"):
    """Fresh random inputs. kind='normal': logits of std ~3; kind='large': std ~100 around -1000, so every
    logit is large and negative. The seed is new each run and printed (pytest shows it on failure)."""
    seed = int(os.environ.get("TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"make_inputs seed: TEST_SEED={seed}")
    torch.manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (3 / h**0.5)
    if kind == "large":
        weight *= 33
        hidden[:, 0] = 1.0  # a constant feature carries the offset
        weight[:, 0] = -1000 - weight[:, 0].abs()
    targets = torch.randint(0, v, (n,))
    if n >= 2:
        targets[0], targets[1] = v - 1, 0  # the last id lives in the masked tail tile
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(),
            targets.to(device))


def reference(hidden, weight, targets, temperature, grad_out):
    """float64 on the same (already rounded) inputs."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    z = (h64 @ w64.T) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp * grad_out.double()).sum().backward()
    # size of the terms each gradient entry sums: |d loss / d logits| @ |W| and its transpose with |hidden|
    with torch.no_grad():
        grad_z = (torch.nn.functional.one_hot(targets, z.shape[1]) - logp_all.exp()) * grad_out.double()[:, None]
        grad_z = grad_z.abs() / temperature
        scales = (grad_z @ w64.abs(), grad_z.T @ h64.abs())
    return logp.detach(), entropy.detach(), h64.grad, w64.grad, z.abs().max().item(), scales


def check_against_reference(dtype, temperature, kind, device="cpu", shape=(N, H, V), **kw):
    hidden, weight, targets = make_inputs(*shape, dtype, kind, device)
    grad_out = torch.randn(shape[0], device=device)
    logp, entropy = logprob_entropy(hidden, weight, targets, temperature=temperature, **kw)
    (logp * grad_out).sum().backward()
    ref_logp, ref_entropy, ref_gh, ref_gw, zmax, scales = reference(hidden, weight, targets, temperature, grad_out)

    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == entropy.shape == (shape[0],)
    assert not entropy.requires_grad
    # fp32 logits carry an absolute error proportional to their magnitude, whatever the input dtype
    atol = 3e-6 * (1 + zmax) * shape[1] ** 0.5
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=atol)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=atol)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    checks = (("hidden", hidden.grad, ref_gh, scales[0]), ("weight", weight.grad, ref_gw, scales[1]))
    for name, got, want, scale in checks:
        if dtype == torch.float32:
            # relative to the largest entry; softmax of fp32 logits of magnitude zmax is off by ~eps * zmax
            err, tol = (got.double() - want).abs().max() / want.abs().max(), 1e-4 + 2e-7 * zmax
        else:
            # bf16 (unit roundoff 2^-8) rounds d loss / d logits, the tile products and the result: error relative
            # to the size of the summed terms (floored, for entries that underflow)
            scale = scale + 1e-6 * want.abs().max()
            err, tol = ((got.double() - want).abs() / scale).max(), 2e-2
        assert err < tol, f"grad {name}: error {err:.2e} >= {tol:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["normal", "large"])
def test_torch_backend_matches_float64(dtype, temperature, kind):
    # 16-row blocks and 64-column tiles: 3 row blocks (last one partial), 5 vocab tiles (last one partial)
    check_against_reference(dtype, temperature, kind, backend="torch", chunk_rows=16, chunk_cols=64)


def test_torch_backend_default_tiles_matches_float64():
    check_against_reference(torch.float32, 1.3, "normal", backend="torch")


def test_naive_baseline_matches_float64():
    hidden, weight, targets = make_inputs(N, H, V, torch.float32, "normal")
    logp, entropy = naive_logprob_entropy(hidden, weight, targets, temperature=0.7)
    ref_logp, ref_entropy, *_ = reference(hidden, weight, targets, 0.7, torch.ones(N))
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-4)


def test_without_entropy_and_without_weight_grad():
    hidden, weight, targets = make_inputs(N, H, V, torch.float32, "normal")
    weight.requires_grad_(False)
    logp, entropy = logprob_entropy(hidden, weight, targets, with_entropy=False, backend="torch", chunk_cols=100)
    assert entropy is None
    logp.sum().backward()
    ref_logp, _, ref_gh, *_ = reference(hidden, weight, targets, 1.0, torch.ones(N))
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), ref_gh, rtol=0, atol=1e-5)
    assert weight.grad is None


def test_tied_embedding_gradients_add_up():
    # the lm_head is the embedding matrix: gradient = embedding part + head part
    vocab, dim, n = 97, 24, 29
    emb = torch.randn(vocab, dim, requires_grad=True)
    proj = torch.randn(dim, dim, requires_grad=True)
    ids, targets = torch.randint(0, vocab, (n,)), torch.randint(0, vocab, (n,))
    logp, _ = logprob_entropy(torch.tanh(emb[ids] @ proj), emb, targets, temperature=0.9, backend="torch",
                              chunk_rows=8, chunk_cols=40)
    logp.sum().backward()
    emb64 = emb.detach().double().requires_grad_()
    proj64 = proj.detach().double().requires_grad_()
    z = torch.tanh(emb64[ids] @ proj64) @ emb64.T / 0.9
    torch.log_softmax(z, -1).gather(1, targets[:, None]).sum().backward()
    # entries up to ~15: float32 rounding reaches ~1e-5 in absolute terms, ~5e-7 of the largest entry
    assert_grad_close(emb.grad.double(), emb64.grad)
    assert_grad_close(proj.grad.double(), proj64.grad)


def test_empty_input_and_bad_arguments():
    hidden, weight, _ = make_inputs(0, H, V, torch.float32, "normal")
    logp, entropy = logprob_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)
    hidden, weight, targets = make_inputs(5, H, V, torch.float32, "normal")
    with pytest.raises(ValueError, match="target ids"):
        logprob_entropy(hidden, weight, torch.full((5,), V))
    with pytest.raises(ValueError, match="hidden"):
        logprob_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="temperature"):
        logprob_entropy(hidden, weight, targets, temperature=0.0)
    if HAS_TRITON and not INTERPRETED:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            pick_backend("triton", torch.device("cpu"))
    assert pick_backend("auto", torch.device("cpu")) == "torch"


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels: interpreter on CPU, compiled on GPU

TRITON_CASES = [(dtype, temperature, kind) for dtype in (torch.float32, torch.bfloat16)
                for temperature, kind in ((1.0, "normal"), (0.7, "large"))]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -r requirements-test.txt)")
def test_triton_interpreter_matches_float64(monkeypatch):
    if not INTERPRETED:
        # TRITON_INTERPRET is read when triton is imported: run this very test again in a fresh interpreter
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"{os.path.abspath(__file__)}::test_triton_interpreter_matches_float64"],
            env=env, capture_output=True, text=True, timeout=300,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "1 passed" in proc.stdout
        return
    import model.kernels
    monkeypatch.setattr(model.kernels, "TRITON_BWD_TILE_BYTES", 1)  # smallest vocab tiles: 256 + a 45-wide tail
    for dtype, temperature, kind in TRITON_CASES:
        check_against_reference(dtype, temperature, kind, backend="triton")
    # without entropy, and the torch path agreeing with the kernel
    hidden, weight, targets = make_inputs(N, H, V, torch.float32, "normal")
    logp, entropy = logprob_entropy(hidden, weight, targets, with_entropy=False, backend="triton")
    assert entropy is None
    torch.testing.assert_close(logp, logprob_entropy(hidden, weight, targets, backend="torch")[0],
                               rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,kind", [(1.0, "normal"), (0.7, "large")])
@pytest.mark.parametrize("shape", [(1000, 320, 151936), (37, 72, 301)])
def test_triton_gpu_matches_float64(dtype, temperature, kind, shape):
    check_against_reference(dtype, temperature, kind, device="cuda", shape=shape, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_backend_on_gpu_is_triton_and_agrees_with_torch():
    assert pick_backend("auto", torch.device("cuda")) == ("triton" if HAS_TRITON else "torch")
    hidden, weight, targets = make_inputs(3000, 256, 49152, torch.bfloat16, "normal", device="cuda")
    a_logp, a_ent = logprob_entropy(hidden, weight, targets, temperature=0.7)
    b_logp, b_ent = logprob_entropy(hidden, weight, targets, temperature=0.7, backend="torch")
    torch.testing.assert_close(a_logp, b_logp, rtol=0, atol=2e-3)
    torch.testing.assert_close(a_ent, b_ent, rtol=0, atol=2e-3)
