"""jaxl2 on sharded params: 8 fake CPU devices, FSDP-like and Megatron-style tensor-parallel meshes.

The penalty, the regularized gradient, ``add_decayed_weights`` and ``make_train_step`` keep each
param's sharding (as far as JAX keeps it for the same loss written by hand), give the values of the
unsharded computation, and gather no param: the penalty and the decay compile no all-gather at all,
the tensor-parallel gradient and step none either, and the FSDP ones only the data loss's own
gathers (the detectors are shown to flag a gathered kernel, so these tests can fail).

The device count is fixed before jax is imported, so everything runs once, in one subprocess
that prints one JSON line; the tests assert on parts of it.
"""

import fcntl
import json
import os
import subprocess
import sys

import pytest

ENV8 = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"}

SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxl2

LAM, LR, RTOL = 1e-3, 0.1, 1e-5
WIDTHS, BATCH = (64, 128, 128, 64), 32  # the batch size is no kernel dimension
DENSE = [f"Dense_{i}" for i in range(3)]
rng = np.random.default_rng(0)
params = {
    name: {
        "kernel": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
        "bias": (0.1 * rng.normal(size=b)).astype(np.float32),
    }
    for name, a, b in zip(DENSE, WIDTHS[:-1], WIDTHS[1:])
}
params["LayerNorm_0"] = {"scale": (1 + 0.1 * rng.normal(size=WIDTHS[2])).astype(np.float32)}
x = rng.normal(size=(BATCH, WIDTHS[0])).astype(np.float32)
y = rng.normal(size=(BATCH, WIDTHS[-1])).astype(np.float32)
u = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)  # an update, for (c)
KERNELS = {tuple(params[n]["kernel"].shape) for n in DENSE}


def loss(p, x, y):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jnp.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]) * p["LayerNorm_0"]["scale"]
    return jnp.mean((h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"] - y) ** 2)


def hand_penalty(p):
    return LAM / 2 * sum(jnp.sum(p[n]["kernel"] ** 2) for n in DENSE)


def hand_loss(p, x, y):
    return loss(p, x, y) + hand_penalty(p)


def grad64(p):
    # the gradient of loss + λ/2·Σw² in float64 NumPy, backpropagated by hand
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    k, b, s = [p[n]["kernel"] for n in DENSE], [p[n]["bias"] for n in DENSE], p["LayerNorm_0"]["scale"]
    h0 = np.tanh(x @ k[0] + b[0])
    t1 = np.tanh(h0 @ k[1] + b[1])
    h1 = t1 * s
    d_o = 2 * (h1 @ k[2] + b[2] - y) / y.size
    dz1 = (d_o @ k[2].T) * s * (1 - t1**2)
    dz0 = (dz1 @ k[1].T) * (1 - h0**2)
    g = {
        n: {"kernel": a.T @ d + LAM * w, "bias": d.sum(0)}
        for n, a, d, w in zip(DENSE, (x, h0, h1), (dz0, dz1, d_o), k)
    }
    g["LayerNorm_0"] = {"scale": ((d_o @ k[2].T) * t1).sum(0)}
    return g


def worst(a, b):
    # max |a − b| / (rtol·|b| + atol) over the leaves, atol = 1e-6·max|b| of the leaf: <= 1 passes
    def one(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b) / (RTOL * np.abs(b) + 1e-6 * np.max(np.abs(b)))))

    return max(jax.tree.leaves(jax.tree.map(one, a, b)))


def lost(out, ref):
    # "path: got S instead of R" for each leaf of out whose sharding is not ref's (a sharding or an array)
    bad = []
    for (kp, o), r in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(ref)):
        want = r if isinstance(r, jax.sharding.Sharding) else r.sharding
        if not o.sharding.is_equivalent_to(want, o.ndim):
            bad.append(f"{jax.tree_util.keystr(kp)}: got {o.sharding.spec} instead of {want.spec}")
    return bad


COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|collective-permute"
    r"|collective-broadcast)(?:-start)?\("
)
GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")  # group 1: the result's type(s)


def hlo_facts(hlo):
    gathers = []  # the result shape of every all-gather
    for line in hlo.splitlines():
        if m := GATHER.search(line):
            for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", m.group(1)):
                gathers.append(tuple(int(d) for d in dims.split(",") if d))
    return {
        "collectives": sorted(set(COLLECTIVE.findall(hlo))),
        "gathers": sorted(gathers),
        "full_kernel_gathers": sorted(g for g in gathers if g in KERNELS),
    }


def compiled(f, *args, **jit):
    c = jax.jit(f, **jit).lower(*args).compile()
    return c, hlo_facts(c.as_text())


devices = np.array(jax.devices())
MESHES = {"dp": Mesh(devices, ("data",)), "tp": Mesh(devices.reshape(2, 4), ("data", "model"))}
SPECS = {
    "dp": {  # FSDP-like: every param split over "data" on its first axis
        **{n: {"kernel": P("data", None), "bias": P("data")} for n in DENSE},
        "LayerNorm_0": {"scale": P("data")},
    },
    "tp": {  # Megatron: column-, row-, column-parallel
        "Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
        "Dense_1": {"kernel": P("model", None), "bias": P()},
        "Dense_2": {"kernel": P(None, "model"), "bias": P("model")},
        "LayerNorm_0": {"scale": P()},
    },
}
BATCH_SPEC = P("data", None)

# the references: float64 NumPy, and the same computations unsharded on one device
pen64 = LAM / 2 * sum(float(np.sum(np.asarray(params[n]["kernel"], np.float64) ** 2)) for n in DENSE)
g64 = grad64(params)
g_one = jax.jit(jax.grad(hand_loss))(params, x, y)
tx_c = optax.chain(jaxl2.add_decayed_weights(LAM), optax.sgd(LR))
c64 = {
    n: {k: -LR * (np.float64(u[n][k]) + (LAM * np.float64(w) if k == "kernel" else 0.0)) for k, w in leaf.items()}
    for n, leaf in params.items()
}
tx_d = optax.sgd(LR, momentum=0.9)
STEPS = {"default": {}, "norms": {"norms": True}}
one_device = {}
for kind, kw in STEPS.items():
    step = jax.jit(jaxl2.make_train_step(loss, tx_d, l2=LAM, **kw))
    p1, s1 = params, tx_d.init(params)
    for _ in range(2):  # the second step has momentum
        p1, s1, m1 = step(p1, s1, x, y)
    one_device[kind] = p1, s1, m1
p64, t64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params), None
for _ in range(2):
    g = grad64(p64)
    t64 = g if t64 is None else jax.tree.map(lambda g, t: g + 0.9 * t, g, t64)
    p64 = jax.tree.map(lambda w, t: w - LR * t, p64, t64)

out = {"device_count": jax.device_count()}
for case, mesh in MESHES.items():
    r = out[case] = {"hlo": {}}
    sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS[case])
    ps, us = jax.device_put(params, sh), jax.device_put(u, sh)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, BATCH_SPEC)) for a in (x, y))
    r["put_lost"] = lost(ps, sh)
    r["kernel_paths"] = [f"['{n}']['kernel']" for n in DENSE]

    # (a) the penalty, and its gradient alone
    f, r["hlo"]["a"] = compiled(lambda p: jaxl2.l2_penalty(p, LAM), ps)
    r["penalty_err"] = abs(float(f(ps)) - pen64) / (RTOL * pen64)
    f, r["hlo"]["a_grad"] = compiled(jax.grad(lambda p: jaxl2.l2_penalty(p, LAM)), ps)
    r["penalty_grad_lost"] = lost(f(ps), sh)
    r["hand_penalty_grad_lost"] = lost(jax.jit(jax.grad(hand_penalty))(ps), sh)

    # (b) the gradient of the regularized loss; the same loss by hand, sharded and not
    f, r["hlo"]["b"] = compiled(jax.grad(jaxl2.regularized(loss, LAM)), ps, xs, ys)
    g = f(ps, xs, ys)
    f, r["hlo"]["b_hand"] = compiled(jax.grad(hand_loss), ps, xs, ys)
    g_hand = f(ps, xs, ys)
    r["grad_lost"] = lost(g, sh)
    r["hand_grad_lost"] = lost(g_hand, sh)
    r["grad_vs_hand_lost"] = lost(g, g_hand)
    r["grad_err"] = worst(g, g_one)
    r["grad_err_f64"] = worst(g, g64)

    # (c) decay in the optimizer: −lr·(u + λ·w) on the kernels, −lr·u elsewhere
    f, r["hlo"]["c"] = compiled(lambda u, p: tx_c.update(u, tx_c.init(p), p)[0], us, ps)
    upd = f(us, ps)
    r["decay_lost"] = lost(upd, sh)
    r["decay_err"] = worst(upd, c64)

    # (d) two donated train steps; a compiled program refuses inputs of other shardings, so the
    # second step runs only if the first kept them
    st_sh = optax.tree_map_params(tx_d, lambda _, s: s, tx_d.init(params), sh)
    r["step"] = {}
    for kind, kw in STEPS.items():
        step = jaxl2.make_train_step(loss, tx_d, l2=LAM, **kw)
        p, s = jax.device_put(params, sh), jax.device_put(tx_d.init(params), st_sh)
        p0 = p
        f, r["hlo"][f"d_{kind}"] = compiled(step, p, s, xs, ys, donate_argnums=(0, 1))
        for _ in range(2):
            p, s, m = f(p, s, xs, ys)
        p1, s1, m1 = one_device[kind]
        r["step"][kind] = {
            "params_lost": lost(p, sh),
            "opt_state_lost": lost(s, st_sh),
            "params_err": worst(p, p1),
            "params_err_f64": worst(p, p64),
            "opt_state_err": worst(s, s1),
            "loss_err": worst(m["loss"], m1["loss"]),
            "donated": all(a.is_deleted() for a in jax.tree.leaves(p0)),
        }

    def hand_step(p, s, x, y):
        upd, s = tx_d.update(jax.grad(hand_loss)(p, x, y), s, p)
        return optax.apply_updates(p, upd), s

    r["hlo"]["d_hand"] = compiled(hand_step, p, s, xs, ys, donate_argnums=(0, 1))[1]

    # deliberately bad: a penalty of the kernels made replicated, a Gram matrix w·wᵀ
    rep = NamedSharding(mesh, P())

    def gathered_penalty(p):
        return LAM / 2 * sum(jnp.sum(jax.lax.with_sharding_constraint(p[n]["kernel"], rep) ** 2) for n in DENSE)

    def gram(p, x, y):
        return loss(p, x, y) + LAM * jnp.sum(p["Dense_1"]["kernel"] @ p["Dense_1"]["kernel"].T)

    r["hlo"]["bad_a"] = compiled(gathered_penalty, ps)[1]
    f, r["hlo"]["bad_b"] = compiled(jax.grad(lambda p, x, y: loss(p, x, y) + gathered_penalty(p)), ps, xs, ys)
    r["bad_grad_lost"] = lost(f(ps, xs, ys), sh)
    r["hlo"]["bad_gram"] = compiled(jax.grad(gram), ps, xs, ys)[1]

print(json.dumps(out))
"""

CASES = ["dp", "tp"]
KINDS = ["default", "norms"]


def run_script():
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=ENV8, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def facts(request, tmp_path_factory):
    """The script's JSON, computed once per session: under pytest-xdist the first worker to get
    here runs it and leaves it for the others in the session's shared temporary directory."""
    if not hasattr(request.config, "workerinput"):
        return run_script()
    shared = tmp_path_factory.getbasetemp().parent / "test_sharding.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shared.exists():
            shared.write_text(json.dumps(run_script()))
        return json.loads(shared.read_text())


def gathers(hlo):
    """An HLO's all-gathers, by result shape (JSON gives lists)."""
    return sorted(tuple(g) for g in hlo["gathers"])


def test_eight_host_devices_and_sharded_params(facts):
    assert facts["device_count"] == 8
    for case in CASES:
        assert facts[case]["put_lost"] == []


@pytest.mark.parametrize("case", CASES)
def test_penalty_equals_float64(facts, case):
    assert facts[case]["penalty_err"] <= 1  # |penalty − λ/2·Σw² in float64| <= 1e-5·penalty


@pytest.mark.parametrize("case", CASES)
def test_penalty_and_decay_compile_no_all_gather(facts, case):
    """Elementwise work and a sum: at most an all-reduce (of the penalty's partial sums)."""
    hlo = facts[case]["hlo"]
    assert hlo["a"]["collectives"] == ["all-reduce"]
    assert hlo["a_grad"]["collectives"] == []  # λ·w, shard by shard
    assert hlo["c"]["collectives"] == []  # u + λ·w, shard by shard


@pytest.mark.parametrize("case", CASES)
def test_penalty_gradient_keeps_the_kernels_shardings(facts, case):
    d = facts[case]
    assert not [p for p in d["penalty_grad_lost"] if p.split(":")[0] in d["kernel_paths"]]
    # the other leaves' zero gradients: whatever JAX does with the penalty written by hand
    assert set(d["penalty_grad_lost"]) <= set(d["hand_penalty_grad_lost"])


@pytest.mark.parametrize("case", CASES)
def test_regularized_gradient_keeps_the_shardings(facts, case):
    d = facts[case]
    assert d["grad_vs_hand_lost"] == []  # each leaf as with loss + λ/2·Σw² by hand
    assert set(d["grad_lost"]) <= set(d["hand_grad_lost"])  # jaxl2 loses none that JAX keeps
    assert not [p for p in d["grad_lost"] if p.split(":")[0] in d["kernel_paths"]]
    if case == "tp":
        assert d["grad_lost"] == []


@pytest.mark.parametrize("case", CASES)
def test_regularized_gradient_values(facts, case):
    assert facts[case]["grad_err"] <= 1  # against the hand-written loss, unsharded
    assert facts[case]["grad_err_f64"] <= 1  # against float64 NumPy backprop


@pytest.mark.parametrize("case", CASES)
def test_add_decayed_weights_keeps_shardings_and_values(facts, case):
    assert facts[case]["decay_lost"] == []
    assert facts[case]["decay_err"] <= 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_train_step_keeps_shardings_and_values(facts, case, kind):
    d = facts[case]["step"][kind]
    assert d["params_lost"] == [] and d["opt_state_lost"] == []
    assert d["params_err"] <= 1 and d["opt_state_err"] <= 1 and d["loss_err"] <= 1
    assert d["params_err_f64"] <= 1
    assert d["donated"]


@pytest.mark.parametrize("case", CASES)
def test_no_param_is_gathered(facts, case):
    hlo = facts[case]["hlo"]
    if case == "tp":
        # Megatron-style layers need only all-reduces: any all-gather would be of a param
        for f in ("b", "d_default", "d_norms"):
            assert hlo[f]["collectives"] == ["all-reduce"], f
    else:
        # FSDP: the data loss itself gathers every param for its forward pass (loss + λ/2·Σw² by
        # hand does too); jaxl2 adds no all-gather to it
        assert hlo["b_hand"]["full_kernel_gathers"]
        assert gathers(hlo["b"]) == gathers(hlo["b_hand"])
        for f in ("d_default", "d_norms"):
            assert gathers(hlo[f]) == gathers(hlo["d_hand"]), f


@pytest.mark.parametrize("case", CASES)
def test_the_detectors_flag_a_gathered_param(facts, case):
    """The checks above can fail: a penalty of replicated kernels, or a Gram matrix, is flagged."""
    d, hlo = facts[case], facts[case]["hlo"]
    kernels = sorted({tuple(g) for g in hlo["bad_a"]["full_kernel_gathers"]})
    assert kernels == [(64, 128), (128, 64), (128, 128)]  # the penalty's check: each kernel
    if case == "tp":
        assert hlo["bad_b"]["full_kernel_gathers"] and hlo["bad_gram"]["full_kernel_gathers"]
    else:
        assert gathers(hlo["bad_b"]) != gathers(hlo["b_hand"])
        assert gathers(hlo["bad_gram"]) != gathers(hlo["b_hand"])
        assert [p for p in d["bad_grad_lost"] if p.split(":")[0] in d["kernel_paths"]]
