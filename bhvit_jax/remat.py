"""Rematerialization that also works on XLA's CPU backend.

`jax.checkpoint` marks the recomputation's inputs with an optimization barrier so that XLA
does not merge it with the forward pass. XLA's CPU pipeline drops those barriers, common
subexpression elimination then merges the two, and the forward activations stay alive until
the backward pass: on CPU `jax.checkpoint` costs time and saves nothing.
`recompute_in_backward` recomputes a function from inputs that only exist in the backward pass
(`fastpath.after`, an ordering constraint that holds on CPU too), so only the inputs are kept.
"""
from flax.core import lift
import flax.linen as nn
import jax
import jax.extend

from bhvit_jax import fastpath


def recompute_in_backward(fun):
  """`fun(inputs, *rest) -> (out, aux)`, saving only its arguments for the backward pass.

  `inputs` (a pytree of activations) is what makes the recomputation distinct from the
  forward pass; parts of `fun` that depend only on `rest` (parameters, PRNG keys) may be shared
  with it. `fun` is traced once and the backward pass replays that trace, so Python-side state
  that tracing advances (Flax's PRNG counters) cannot make the recomputation differ. Only `out`
  is differentiated; `aux` (e.g. a module's updated batch statistics) is treated as a constant.
  Non-float arguments (PRNG keys, counters) get no cotangent.
  """

  def call(*args):
    flat_args, in_tree = jax.tree_util.tree_flatten(args)
    closed, out_shapes = jax.make_jaxpr(
        lambda *flat: fun(*jax.tree_util.tree_unflatten(in_tree, flat)),
        return_shape=True)(*flat_args)
    replay = jax.extend.core.jaxpr_as_fun(closed)
    n_out = len(jax.tree_util.tree_leaves(out_shapes[0]))
    n_inputs = len(jax.tree_util.tree_leaves(args[0]))
    is_float = [fastpath.is_float(leaf) for leaf in flat_args]

    @jax.custom_vjp
    def run(*flat):
      return replay(*flat)

    def forward(*flat):
      return replay(*flat), flat

    def backward(flat, cotangents):
      cotangents = list(cotangents[:n_out])
      # Inputs that exist only once the cotangents do: the recomputation is neither merged
      # with the forward pass nor scheduled before the backward pass reaches it. `after`, not
      # `opaque`: passing the inputs through a conditional copied each of them. The function
      # itself runs outside any conditional (XLA:CPU does not canonicalize convolutions inside
      # one, so their gradients run far slower there), and parameters are not touched.
      flat = fastpath.after(tuple(flat[:n_inputs]), cotangents[0]) + tuple(flat[n_inputs:])

      def out_of(*floats):
        it = iter(floats)
        return replay(*[next(it) if f else leaf for leaf, f in zip(flat, is_float)])[:n_out]

      floats = [leaf for leaf, f in zip(flat, is_float) if f]
      grads = iter(jax.vjp(out_of, *floats)[1](cotangents))
      return tuple(next(grads) if f else None for f in is_float)

    run.defvjp(forward, backward)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shapes),
                                        run(*flat_args))

  return call


def recompute(fn, static_argnums=()):
  """`recompute_in_backward` lifted over a Flax scope (all collections and PRNG streams)."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    static = {i: a for i, a in enumerate(args) if i in static_argnums}
    dynamic = [a for i, a in enumerate(args) if i not in static]

    def pure(dynamic, variable_groups, rng_groups):
      it = iter(dynamic)
      full = [static[i] if i in static else next(it) for i in range(len(args))]
      scope = scope_fn(variable_groups, rng_groups)
      return fn(scope, *full), repack_fn(scope)

    return recompute_in_backward(pure)(tuple(dynamic), variable_groups, rng_groups)

  return lift.pack(inner, (True,), (True,), (True,), name='remat')


def remat(module_cls, static_argnums=()):
  """`module_cls` whose `__call__` is recomputed in the backward pass (`recompute_in_backward`).

  `static_argnums` count the call's arguments after `self` from 1, as in `nn.remat`.
  """
  return nn.transforms.lift_transform(recompute, module_cls,
                                      static_argnums=tuple(i - 1 for i in static_argnums))
