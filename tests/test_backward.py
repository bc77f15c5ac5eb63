"""Hand-written backward passes, checked three ways: torch autograd on the same numbers, finite differences in
float64, and (for the real SmolLM2) gradients that transformers computes."""
import numpy as np
import pytest

from helpers import WEIGHT_NAMES, load_npz, real_example, tiny_llama
from tinyllava import ops, projector
from tinyllava.ops import causal_mask
from tinyllava.sequences import collate, pack


def packed_example(model, seed, n_prefix=5, caption_lengths=(3, 4, 2)):
    rng = np.random.default_rng(seed)
    prefix = rng.standard_normal((n_prefix, model.cfg.dim)).astype(model.norm.dtype)
    caps = [list(rng.integers(0, model.cfg.vocab_size, n)) for n in caption_lengths]
    return prefix, pack(prefix, caps)


def embed_fn(model):
    return lambda ids: model.embedding[np.asarray(ids)]


# -- single operations against torch autograd -------------------------------------------------------------
def test_ops_match_torch_autograd(reference):
    import torch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 6, 8))
    dy = rng.standard_normal(x.shape)
    w = rng.standard_normal(8)
    tx = torch.tensor(x, requires_grad=True)
    (torch.sum(tx / torch.sqrt((tx * tx).mean(-1, keepdim=True) + 1e-5) * torch.tensor(w) * torch.tensor(dy))).backward()
    np.testing.assert_allclose(ops.rms_norm_backward(dy, x, w, 1e-5)[0], tx.grad.numpy(), rtol=1e-10, atol=1e-12)

    q, k, v = rng.standard_normal((2, 5, 6, 8)), rng.standard_normal((2, 5, 2, 8)), rng.standard_normal((2, 5, 2, 8))
    mask = causal_mask(5) & (rng.random((2, 1, 5, 5)) < 0.8) | np.eye(5, dtype=bool)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    s = (tq.transpose(1, 2) @ tk.transpose(1, 2).repeat_interleave(3, 1).transpose(-1, -2)) / np.sqrt(8)
    p = torch.softmax(s.masked_fill(~torch.tensor(mask), float("-inf")), -1)
    out = (p @ tv.transpose(1, 2).repeat_interleave(3, 1)).transpose(1, 2)
    np.testing.assert_allclose(ops.attention(q, k, v, mask), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    (out * torch.tensor(dy)).sum().backward()
    for ours, t in zip(ops.attention_backward(dy, q, k, v, mask), (tq, tk, tv)):
        np.testing.assert_allclose(ours, t.grad.numpy(), rtol=1e-9, atol=1e-11)

    xs = rng.standard_normal((3, 7)) * 3
    tx = torch.tensor(xs, requires_grad=True)
    torch.nn.functional.gelu(tx, approximate="tanh").backward(torch.tensor(np.ones_like(xs)))
    np.testing.assert_allclose(ops.gelu_tanh(xs), torch.nn.functional.gelu(torch.tensor(xs), approximate="tanh"),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ops.gelu_tanh_backward(np.ones_like(xs), xs), tx.grad.numpy(), rtol=1e-10)


@pytest.mark.parametrize("kind", list(projector.KINDS))
def test_projector_backward_matches_torch(kind, reference):
    import torch
    proj = projector.Projector.init(kind, d_in=12, d_out=7, seed=3)
    proj.params = {k: v.astype(np.float64) for k, v in proj.params.items()}
    f = np.random.default_rng(4).standard_normal((2, 5, 12))
    dy = np.random.default_rng(5).standard_normal((2, 5, 7))
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in proj.params.items()}
    y = torch.tensor(f) @ tp["w0"].T + tp["b0"]
    if kind == "mlp2x_gelu":
        y = torch.nn.functional.gelu(y, approximate="tanh") @ tp["w2"].T + tp["b2"]
    np.testing.assert_allclose(proj.forward(f), y.detach().numpy(), rtol=1e-12)
    (y * torch.tensor(dy)).sum().backward()
    grads = proj.backward(dy, f)
    assert set(grads) == set(tp)
    for k in grads:
        np.testing.assert_allclose(grads[k], tp[k].grad.numpy(), rtol=1e-10, atol=1e-12)


# -- the whole decoder -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,kw", [(0, {}), (1, dict(n_heads=4, n_kv_heads=4, n_layers=3)),
                                     (2, dict(n_heads=8, n_kv_heads=1, dim=32, ffn_dim=24))])
def test_decoder_backward_matches_torch_on_packed_sequences(seed, kw, reference):
    model = tiny_llama(seed, **kw)
    prefix, (ids, pos, mask, at, targets) = packed_example(model, seed)
    x = np.concatenate([prefix, model.embedding[ids[len(prefix):]]])[None]
    loss, dx, _ = model.loss_and_grad(x, at, targets, pos, mask)
    tloss, tx = reference.torch_decoder_loss(model, x, at, targets, pos, mask)
    tloss.backward()
    assert abs(loss - tloss.item()) < 1e-10 * abs(loss)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_padded_batch_of_packed_sequences_matches_torch(reference):
    model = tiny_llama(5)
    examples = [packed_example(model, s, n_prefix=4 + s, caption_lengths=[2 + s, 3]) for s in range(3)]
    x, pos, mask, at, targets = collate([e[1] for e in examples], [e[0] for e in examples], embed_fn(model))
    loss, dx, _ = model.loss_and_grad(x, at, targets, pos, mask)
    tloss, tx = reference.torch_decoder_loss(model, x, at, targets, pos, mask)
    tloss.backward()
    assert abs(loss - tloss.item()) < 1e-10 * abs(loss)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    # and each packed sequence gives the same loss and gradient alone as inside the padded batch
    total = 0.0
    for b, (prefix, s) in enumerate(examples):
        xb, pb, mb, ab, tb = collate([s], [prefix], embed_fn(model))
        lb, db, _ = model.loss_and_grad(xb, ab, tb, pb, mb)
        total += lb
        np.testing.assert_allclose(dx[b, :db.shape[1]], db[0], rtol=1e-9, atol=1e-12)
    assert abs(total - loss) < 1e-9 * abs(loss)


def test_packing_equals_one_sequence_per_caption():
    """The packed sequence's loss and prefix gradient are the sums over separate [prefix | caption] runs."""
    model = tiny_llama(6)
    prefix, (ids, pos, mask, at, targets) = packed_example(model, 6)
    x = np.concatenate([prefix, model.embedding[ids[len(prefix):]]])[None]
    loss, dx, _ = model.loss_and_grad(x, at, targets, pos, mask)
    P, total, dprefix = len(prefix), 0.0, 0
    caps = np.split(ids[P:], np.cumsum([3, 4]))
    for cap in caps:
        xs = np.concatenate([prefix, model.embedding[cap]])[None]
        l, d, _ = model.loss_and_grad(xs, np.arange(P - 1, P - 1 + len(cap)), cap)
        total += l
        dprefix = dprefix + d[0, :P]
    assert abs(total - loss) < 1e-10 * abs(loss)
    np.testing.assert_allclose(dx[0, :P], dprefix, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_decoder_and_projector_gradients_match_finite_differences(seed):
    """Directional derivatives in float64: (L(p + eps v) - L(p - eps v)) / 2 eps against <grad, v>."""
    model = tiny_llama(10 + seed)
    rng = np.random.default_rng(seed)
    proj = projector.Projector.init("mlp2x_gelu", d_in=9, d_out=model.cfg.dim, seed=seed)
    proj.params = {k: v.astype(np.float64) for k, v in proj.params.items()}
    feats = rng.standard_normal((4, 9))
    caps = [list(rng.integers(0, 61, n)) for n in (3, 2)]

    def loss_and_grads(params):
        proj.params = params
        prefix = proj.forward(feats)
        ids, pos, mask, at, targets = pack(prefix, caps)
        x = np.concatenate([prefix, model.embedding[ids[len(prefix):]]])[None]
        loss, dx, _ = model.loss_and_grad(x, at, targets, pos, mask)
        return loss, proj.backward(dx[0, :len(prefix)], feats)

    p0 = {k: v.copy() for k, v in proj.params.items()}
    _, grads = loss_and_grads(p0)
    for _ in range(3):
        v = {k: rng.standard_normal(a.shape) for k, a in p0.items()}
        eps = 1e-5
        lp, _ = loss_and_grads({k: p0[k] + eps * v[k] for k in p0})
        lm, _ = loss_and_grads({k: p0[k] - eps * v[k] for k in p0})
        numeric = (lp - lm) / (2 * eps)
        analytic = sum(float((grads[k] * v[k]).sum()) for k in p0)
        assert abs(numeric - analytic) < 1e-6 * max(1, abs(analytic)), (numeric, analytic)


# -- the real SmolLM2 --------------------------------------------------------------------------------------
def test_real_decoder_gradient_matches_saved_reference(decoder):
    model, tok = decoder
    ref = load_npz("gradient.npz")
    x, at, targets = real_example(model, tok)
    np.testing.assert_array_equal(x, ref["x"])
    loss, dx, _ = model.loss_and_grad(x[None], at, targets)
    assert abs(loss - float(ref["loss"])) < 1e-4 * abs(loss)
    assert np.abs(dx[0] - ref["grad"]).max() < 1e-4 * np.abs(ref["grad"]).max()  # measured 1.2e-5


def test_real_decoder_gradient_matches_live_transformers(decoder, reference):
    model, tok = decoder
    rng = np.random.default_rng(1)
    cap = tok.encode("Two children play on a beach near the water.") + [tok.eos_id]
    x = np.concatenate([(rng.standard_normal((4, 576)) * 0.05).astype(np.float32), model.embed(cap[:-1])])
    at = np.arange(3, len(x))
    loss, dx, _ = model.loss_and_grad(x[None], at, np.array(cap))
    ref_loss, ref_grad = reference.hf_input_grad(x, at, cap)
    assert abs(loss - ref_loss) < 1e-4 * abs(loss)
    assert np.abs(dx[0] - ref_grad).max() < 1e-4 * np.abs(ref_grad).max()


# -- weight gradients (stage 2) ----------------------------------------------------------------------------
def stage2_example(model, seed, n_feats=4, d_in=9):
    """A projector, image features, a text prefix and two conversations (ids, targets) about one image."""
    rng = np.random.default_rng(seed)
    proj = projector.Projector.init("mlp2x_gelu", d_in=d_in, d_out=model.cfg.dim, seed=seed)
    proj.params = {k: v.astype(np.float64) for k, v in proj.params.items()}
    segs = [(list(rng.integers(0, 61, 5)), [False, False, True, True, True]),
            (list(rng.integers(0, 61, 4)), [False, True, False, True])]
    return proj, rng.standard_normal((n_feats, d_in)), [7, 3, 11], segs


def torch_stage2_loss(model, proj, feats, prefix_ids, segs, leaves):
    """The same step in torch: [text | projector(features) | conversations], packed; leaves: {name: tensor}."""
    import torch
    from tinyllava.sequences import pack
    from tinyllava.ops import gelu_tanh  # noqa: F401 (torch's tanh GELU is the same function)
    p = {k: leaves[f"proj.{k}"] for k in proj.params}
    f = torch.as_tensor(feats)
    img = torch.nn.functional.gelu(f @ p["w0"].T + p["b0"], approximate="tanh") @ p["w2"].T + p["b2"]
    E = leaves.get("token_embd.weight", torch.as_tensor(model.embedding))
    prefix = torch.cat([E[torch.as_tensor(prefix_ids)], img])
    ids, pos, mask, at, targets = pack(np.zeros((len(prefix), 1)), segs)
    x = torch.cat([prefix, E[torch.as_tensor(ids[len(prefix):])]])[None]
    loss, _ = reference_impl_loss(model, x, at, targets, pos, mask, leaves)
    return loss


def reference_impl_loss(*args):
    import reference_impl
    return reference_impl.torch_decoder_loss(*args)


@pytest.mark.parametrize("seed,kw", [(0, {}), (1, dict(n_heads=8, n_kv_heads=1, dim=32, ffn_dim=24))])
def test_full_finetuning_gradients_match_torch(seed, kw, reference):
    """Every weight of the decoder (each linear, both norms, the tied embedding as input table and output matrix)
    and the projector, through a packed stage-2 sequence with a loss mask."""
    import torch
    from tinyllava.train import batch_loss_and_grads
    model = tiny_llama(seed, **kw)
    proj, feats, prefix_ids, segs = stage2_example(model, seed)
    params = {f"proj.{k}": v for k, v in proj.params.items()} | model.named_weights()
    loss, n, grads = batch_loss_and_grads(model, proj, [feats], [segs], prefix_ids, params=params)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tloss = torch_stage2_loss(model, proj, feats, prefix_ids, segs, leaves)
    tloss.backward()
    assert n == 5 and abs(loss - tloss.item()) < 1e-10 * abs(loss)
    assert set(grads) == set(leaves)
    for k, g in grads.items():
        np.testing.assert_allclose(g, leaves[k].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=k)


def test_lora_gradients_match_torch(reference):
    """LoRA on every linear (B made non-zero, so every path carries gradient): the adapters' A and B and the
    projector, against autograd through W + s B A."""
    import torch
    from tinyllava import lora
    from tinyllava.train import batch_loss_and_grads
    model = tiny_llama(3)
    frozen = {k: torch.tensor(v) for k, v in model.named_weights().items()}
    params = lora.attach(model, rank=3, alpha=6.0, seed=1)
    for k, v in params.items():
        if k.endswith("lora_b"):
            v[...] = np.random.default_rng(len(k)).standard_normal(v.shape) * 0.1
    params = {k: v.astype(np.float64) if v.dtype != np.float64 else v for k, v in params.items()}
    for name, m in lora.adapters(model).items():  # float64 throughout
        m.a, m.b, m.scale = params[name + ".lora_a"], params[name + ".lora_b"], 2.0
    proj, feats, prefix_ids, segs = stage2_example(model, 3)
    params |= {f"proj.{k}": v for k, v in proj.params.items()}
    loss, _, grads = batch_loss_and_grads(model, proj, [feats], [segs], prefix_ids, params=params)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    effective = dict(frozen)
    for name in lora.adapters(model):
        effective[name] = frozen[name] + 2.0 * leaves[name + ".lora_b"] @ leaves[name + ".lora_a"]
    tloss = torch_stage2_loss(model, proj, feats, prefix_ids, segs, effective | leaves)
    tloss.backward()
    assert abs(loss - tloss.item()) < 1e-10 * abs(loss)
    for k in params:
        np.testing.assert_allclose(grads[k], leaves[k].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_weight_gradients_match_finite_differences(mode):
    """Directional derivatives in float64 over every trained number at once."""
    from tinyllava import lora
    from tinyllava.train import batch_loss_and_grads
    model = tiny_llama(21)
    proj, feats, prefix_ids, segs = stage2_example(model, 21)
    if mode == "lora":
        params = lora.attach(model, rank=2, alpha=4.0, seed=2)
        for name, m in lora.adapters(model).items():
            m.a = params[name + ".lora_a"] = m.a.astype(np.float64)
            m.b = params[name + ".lora_b"] = np.random.default_rng(5).standard_normal(m.b.shape) * 0.1
    else:
        params = model.named_weights()
    params |= {f"proj.{k}": v for k, v in proj.params.items()}
    _, _, grads = batch_loss_and_grads(model, proj, [feats], [segs], prefix_ids, params=params)
    rng = np.random.default_rng(0)
    p0 = {k: v.copy() for k, v in params.items()}
    for _ in range(2):
        v = {k: rng.standard_normal(a.shape) for k, a in p0.items()}
        norm = np.sqrt(sum(float((a * a).sum()) for a in v.values()))
        v = {k: a / norm for k, a in v.items()}  # a unit step over ~20,000 numbers: small third-order terms
        eps, losses = 1e-4, []
        for sign in (1, -1):
            for k in params:
                params[k][...] = p0[k] + sign * eps * v[k]
            losses.append(batch_loss_and_grads(model, proj, [feats], [segs], prefix_ids, params=params)[0])
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = sum(float((grads[k] * v[k]).sum()) for k in p0)
        assert abs(numeric - analytic) < 1e-6 * abs(analytic), (numeric, analytic)
    for k in params:
        params[k][...] = p0[k]




def test_real_decoder_weight_gradients_match_saved_reference(decoder):
    model, tok = decoder
    ref = load_npz("weight_gradient.npz")
    x, at, targets = real_example(model, tok)
    _, _, grads = model.loss_and_grad(x[None], at, targets, need_dw=True)
    for name in WEIGHT_NAMES:
        assert np.abs(grads[name][:64] - ref[name]).max() < 3e-4 * np.abs(ref[name]).max(), name


def test_real_decoder_weight_gradients_match_live_transformers(decoder, reference):
    """The weight gradients of the real SmolLM2 for a short sequence, against transformers' autograd (float32;
    Q and K compared in the GGUF's row order). Measured: at most 8e-5 of the largest entry."""
    model, tok = decoder
    rng = np.random.default_rng(1)
    cap = tok.encode("Two children play on a beach near the water.") + [tok.eos_id]
    x = np.concatenate([(rng.standard_normal((4, 576)) * 0.05).astype(np.float32), model.embed(cap[:-1])])
    at = np.arange(3, len(x))
    loss, _, grads = model.loss_and_grad(x[None], at, np.array(cap), need_dw=True)
    ref_loss, ref_grads = reference.hf_weight_grads(x, at, cap, WEIGHT_NAMES)
    assert abs(loss - ref_loss) < 1e-4 * abs(loss)
    for name in WEIGHT_NAMES:
        assert np.abs(grads[name] - ref_grads[name]).max() < 3e-4 * np.abs(ref_grads[name]).max(), name
