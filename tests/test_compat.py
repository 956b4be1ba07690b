"""jaxprune._compat: the dependency-version shims, each checked on the installed versions and on the old form."""
from __future__ import annotations

import re
import warnings

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxprune import _compat
from jaxprune.similarity import _linalg


def test_version_tuple_reads_releases_and_dev_builds():
    assert _compat.version_tuple("0.10.2") == (0, 10, 2)
    assert _compat.version_tuple("0.12.0.dev20250101") == (0, 12, 0)
    assert _compat.version_tuple("0.11.1rc1") == (0, 11, 1)
    assert _compat.version_tuple("1.2") == (1, 2, 0)
    assert _compat.version_tuple("0.12.0.1") > _compat.version_tuple("0.11.1") > _compat.version_tuple("0.11.0")


def test_lapack_serialisation_is_gated_on_jaxlib_0_11_1_and_used_by_the_similarity_code():
    release = tuple(int(x) for x in re.findall(r"\d+", jaxlib.__version__)[:3])
    assert _compat.SERIALISE_LAPACK == (release < (0, 11, 1))
    assert _linalg._SERIALISE is _compat.SERIALISE_LAPACK


def test_bind_params_rebinds_every_equation_of_a_program_to_the_same_values():
    def f(x):
        return jnp.sum(jax.nn.relu(jnp.sin(x) @ x.T) * 2.0)  # a custom_jvp call (relu) among plain primitives

    x = jnp.arange(6.0).reshape(2, 3) / 7
    closed = jax.make_jaxpr(f)(x)
    env = dict(zip(closed.jaxpr.invars, [x]))
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for eqn in closed.jaxpr.eqns:
        subfuns, params = _compat.bind_params(eqn.primitive, eqn.params)
        out = eqn.primitive.bind(*subfuns, *map(read, eqn.invars), **params)
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
    np.testing.assert_array_equal(np.asarray(env[closed.jaxpr.outvars[0]]), np.asarray(f(x)))


def test_bind_params_takes_the_old_pair_form():
    class OldPrimitive:  # jax < 0.7: get_bind_params returned (subfuns, params)
        def get_bind_params(self, params):
            return (len,), {**params, "extra": 1}

    assert _compat.bind_params(OldPrimitive(), {"a": 2}) == ((len,), {"a": 2, "extra": 1})


def test_variable_value_reads_nnx_variables_without_the_deprecated_attribute():
    from flax import nnx

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `.value` warns on this flax: the shim must not touch it
        assert float(_compat.variable_value(nnx.Param(jnp.float32(2.5)))) == 2.5

    class OldVariable:  # a flax without get_value
        value = 7

    assert _compat.variable_value(OldVariable()) == 7


def test_every_shim_in_the_docstring_table_exists():
    names = re.findall(r"^:(?:data|func):`(\w+)`", _compat.__doc__, re.M)
    assert names == ["SERIALISE_LAPACK", "bind_params", "variable_value"]
    assert all(hasattr(_compat, n) for n in names)
