"""A killed or interrupted run loses nothing; divergence stops cleanly; properties of the penalty."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxl2
from jaxl2 import select

RUN = [
    "--hidden",
    "64",
    "--epochs",
    "24",
    "--batch-size",
    "64",
    "--checkpoint-every",
    "1",
    "--quiet",
    "--no-refit",
]


def start(out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxl2", "train", *RUN, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def final_params(out):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints"))) as m:
        assert m.latest_step() == 24
        return m.restore(m.latest_step())["state"]["params"]


def has_checkpoint(out):
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    p = start(ref)
    assert p.wait(timeout=300) == 0, p.stderr.read()

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    proc = start(out)
    deadline = time.time() + 240
    while kills < 3 and time.time() < deadline:
        while not has_checkpoint(out) and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = start(out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    print(f"killed {kills} times")
    assert kills >= 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, 25))
    for u, v in zip(jax.tree.leaves(final_params(ref)), jax.tree.leaves(final_params(out))):
        np.testing.assert_array_equal(u, v)


def test_sigint_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "int"
    proc = start(out)
    while not has_checkpoint(out) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert proc.returncode == 130, err
    assert f"jaxl2 train --out {out} --resume" in err and "Traceback" not in err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(out / "checkpoints")) as m:
        assert m.latest_step() == rows[-1]["epoch"]  # the interrupted epoch was checkpointed
    done = start(out, "--resume")
    assert done.wait(timeout=300) == 0


def test_divergence_stops_with_message_and_checkpoint_loads(tmp_path):
    out = tmp_path / "nan"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxl2",
            "train",
            "--hidden",
            "32",
            "--epochs",
            "30",
            "--optimizer",
            "sgd",
            "--schedule",
            "constant",
            "--lr",
            "0.5",
            "--l2",
            "5",
            "--checkpoint-every",
            "1",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert (
        "the loss became NaN/Inf at epoch" in r.stderr and "lower --lr" in r.stderr and "λ·lr 2.5" in r.stderr
    )
    assert "Traceback" not in r.stderr
    epoch = int(r.stderr.split("at epoch ")[1].split(",")[0])
    assert epoch > 1  # |1 − lr·λ| = 1.5: the kernels grow 1.5× a step and overflow in epoch 2
    if epoch > 1:
        assert f"last good checkpoint (epoch {epoch - 1})" in r.stderr
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(os.path.abspath(out / "checkpoints")) as m:
            params = m.restore(m.latest_step())["state"]["params"]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "train", "--resume", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("jaxl2: error: ")
    assert "config" in r.stderr or "checkpoint" in r.stderr


def test_nothing_unpickles():
    root = os.path.join(os.path.dirname(__file__), "..", "jaxl2")
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "pickle" not in text and "allow_pickle=True" not in text, name


# -- property tests ----------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float64])


@st.composite
def pytrees(draw, depth=0):
    """Nested dicts/lists whose leaves are arrays of random shape and float dtype."""
    if depth >= 3 or draw(st.booleans()) and depth > 0:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        seed = draw(st.integers(0, 2**16))
        return ("leaf", shape, draw(dtypes), seed)
    if draw(st.booleans()):
        keys = draw(st.lists(names, min_size=1, max_size=3, unique=True))
        return {k: draw(pytrees(depth + 1)) for k in keys}
    return [draw(pytrees(depth + 1)) for _ in range(draw(st.integers(1, 3)))]


def materialize(spec):
    def build(s):
        if isinstance(s, tuple) and s and s[0] == "leaf":
            _, shape, dtype, seed = s
            return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)
        if isinstance(s, dict):
            return {k: build(v) for k, v in s.items()}
        return [build(v) for v in s]

    return build(spec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# λ from 1e-6: XLA on CPU flushes subnormal products (λ·w below ~1e-38) to zero.
@given(spec=pytrees(), lam=st.one_of(st.just(0.0), st.floats(1e-6, 10)), pick=st.integers(0, 2**16))
def test_penalty_and_gradient_properties(spec, lam, pick):
    with jax.enable_x64(True):
        params = materialize(spec)
        leaves = select.leaves(params)
        paths = [p for p, _ in leaves]
        chosen = {p for i, p in enumerate(paths) if (pick >> (i % 16)) & 1}
        pred = lambda path, leaf: path in chosen  # noqa: E731
        if not chosen:
            with pytest.raises(ValueError, match="matched no parameter"):
                jaxl2.l2_penalty(params, lam, select=pred)
            return
        expected = sum(lam / 2 * np.sum(np.asarray(w, np.float64) ** 2) for p, w in leaves if p in chosen)
        pen = jaxl2.l2_penalty(params, lam, select=pred)
        assert float(pen) == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert pen.dtype in (jnp.float32, jnp.float64)
        grads = jax.grad(lambda q: jaxl2.l2_penalty(q, lam, select=pred))(params)
        for (path, w), (_, g) in zip(leaves, select.leaves(grads)):
            assert g.dtype == w.dtype
            if path in chosen:
                want = (
                    (lam * np.asarray(w, np.float64)).astype(np.asarray(w).dtype)
                    if w.dtype != jnp.bfloat16
                    else np.asarray(
                        (jnp.asarray(lam, jnp.float32) * w.astype(jnp.float32)).astype(jnp.bfloat16)
                    )
                )
                np.testing.assert_allclose(
                    np.asarray(g, np.float64),
                    np.asarray(want, np.float64),
                    rtol=2e-7 if w.dtype == jnp.float32 else 1e-15,
                )
            else:
                assert not np.asarray(g, np.float64).any()
