"""Pytree surgery on the unit table: removing units (:func:`shrink`), silencing them (:func:`silence`) and
rebuilding the smaller model (:func:`rebuild`).

A linen model whose widths are written inline (``nn.Dense(48)`` inside ``@nn.compact``, no ``with_widths``, no
width field) is rebuilt by interception: the returned model is an instance of a subclass of the model's class (same
name, same fields, same variable tree) whose ``__call__`` runs the original under
:func:`flax.linen.intercept_methods`; the interceptor gives each submodule at a shrunk layer's module path (its scope
path, never its class) the new value of the integer field that held the old width (``features=48`` → ``40``), found
by matching the field's value with the kernel's old output size, while the submodule's methods (``setup`` included)
run. Only ``__call__`` is intercepted (a model applied through ``method=`` gets the original widths)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph.model_graph import Graph
from jaxprune.graph.program import _path_str

Array = jax.Array
PyTree = Any


def shrink(g: Graph, keep: Mapping[str, Any]) -> list[Array]:
    """The variables' leaves with every unit not kept removed: ``keep: {layer: kept indices}`` (others untouched).

    Every leaf axis indexed by the removed units shrinks: kernels (their output and the consumers' input axes,
    through flattening, pooling and concatenation), biases, BatchNorm parameters and statistics."""
    removed = g.removed_units(keep)
    leaves = list(g.net.leaves)
    for leaf, axis, ids in g.slices:
        on = ~removed[ids]
        if on.all():
            continue
        leaves[leaf] = jnp.take(leaves[leaf], jnp.asarray(np.flatnonzero(on)), axis=axis)
    return leaves


def silence(g: Graph, keep: Mapping[str, Any]) -> list[Array]:
    """Same shapes, the units not kept silenced: their kernel columns and the chain's per-channel offsets and
    scales (bias; BatchNorm's scale and bias) zeroed, so their pre-activation is exactly 0, and the input rows of
    every layer reading them zeroed, so whatever the activation makes of 0 reaches no consumer (the network then
    computes what the shrunk one does). An empty ``keep`` for a layer silences all of it. Units normalised together
    with other channels (a LayerNorm or RMSNorm statistic, ``Graph.normed``) are refused: zeros still count in the
    statistic, so no masking equals their removal."""
    removed = g.removed_units(keep)
    _refuse_normed(g, removed)
    leaves = list(g.net.leaves)
    by_leaf: dict[int, list] = {}
    for leaf, axis, ids in g.slices:
        by_leaf.setdefault(leaf, []).append((axis, ids))
    targets = []
    for name in keep:
        l = g.layers[name]
        targets.append((l.kernel, l.out_axis))
        targets += [(leaf, axis) for leaf in l.zero for axis, _ in by_leaf.get(leaf, [])]
    # the consumers' input rows: a silenced unit still sends act(0) (sigmoid: 0.5; ReLU → BatchNorm: BN(0) ≠ 0)
    targets += [(l.kernel, l.in_axis) for l in g.layers.values() if l.in_axis in dict(by_leaf.get(l.kernel, []))]
    for leaf, axis in dict.fromkeys(targets):
        ids = dict(by_leaf[leaf])[axis]
        off = removed[ids]
        if not off.any():
            continue
        shape = [1] * len(np.shape(leaves[leaf]))
        shape[axis] = ids.size
        leaves[leaf] = jnp.where(jnp.asarray(~off).reshape(shape), leaves[leaf], jnp.zeros_like(leaves[leaf]))
    return leaves


def _refuse_normed(g: Graph, removed: np.ndarray) -> None:
    """A one-line error naming the norm when a removed unit is normalised together with other channels."""
    for c in np.unique(g.cls[removed]).tolist():
        if int(c) in g.normed:
            who = sorted({g._owner_name(int(u)) for u in np.flatnonzero(removed & (g.cls == c))})
            raise ValueError(f"keep: units of {who} are normalised together with other channels by {g.normed[c]!r} "
                             "(a statistic over the channel axis): masking them changes that statistic, removing "
                             "them defines the smaller model; use remove_units / remove_many")


def rebuild(g: Graph, leaves: Sequence[Array], widths: Mapping[str, int], x: Any) -> tuple[Any, PyTree]:
    """``(smaller model, its variables)`` for shrunk ``leaves`` whose layers now have ``widths`` units.

    Uses, in this order, the model's ``with_widths`` hook, its ``with_shapes(shapes: dict[leaf path, shape])``
    hook, for NNX the shrunk state with the modules' width attributes updated (:func:`_rebuild_nnx`; returns
    ``(graphdef, state)``), linen integer width fields, and for the layers left, interception of the submodules'
    calls (see the module docstring); checks that the rebuilt model's variable shapes are the shrunk ones."""
    n = g.net
    tree = n.with_leaves(leaves)
    model = n.model
    if hasattr(model, "with_widths"):
        new_model = model.with_widths(dict(widths))
    elif hasattr(model, "with_shapes"):  # a model whose variables' shapes set its widths (an NNX model as linen)
        new_model = model.with_shapes({p: tuple(np.shape(a)) for p, a in zip(n.paths, leaves)})
    elif n.kind == "nnx":
        return _rebuild_nnx(g, leaves)
    else:
        new_model = _rebuild_linen(g, model, widths, x, leaves)
    try:
        bad = _mismatch(n, new_model, leaves, x)
    except Exception as e:
        raise ValueError(f"model: the rebuilt model ({type(new_model).__name__} with widths {dict(widths)}) does "
                         f"not initialise: {str(e).splitlines()[0]}") from e
    if bad:
        p, (g_, w_) = next(iter(bad.items()))
        raise ValueError(f"model: the rebuilt model's variable {p!r} has shape {g_}, the shrunk variables {w_}: its "
                         "with_widths hook (or width field) does not set the widths it was given")
    return new_model, tree


def _mismatch(n, model, leaves: Sequence[Array], x, under: str = "") -> dict[str, tuple]:
    """``{leaf path: (rebuilt shape, shrunk shape)}`` where ``model``'s abstract ``init`` differs from ``leaves``
    (only the leaves under module path ``under`` when given); raises what ``init`` raises."""
    spec = jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x) if not isinstance(
        x, jax.ShapeDtypeStruct) else x.dtype)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(spec.shape, spec.dtype),
                                               **dict(n.call_kwargs)))
    want = {p: tuple(np.shape(a)) for p, a in zip(n.paths, leaves)}
    if under:
        want = {p: s for p, s in want.items() if n.module_path(n.paths.index(p)) == under}
    got = {_path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(shapes)
           if _path_str(p).split("/")[0] in {q.split("/")[0] for q in n.paths}}
    return {p: (got.get(p), s) for p, s in want.items() if got.get(p) != s}


def _rebuild_linen(g: Graph, model, widths: Mapping[str, int], x, leaves: Sequence[Array]) -> Any:
    """Width fields of the model first (:func:`_discover_fields`), interception for the layers they do not set,
    then for the grouped and depthwise convolutions whose fields still hold old sizes (:func:`_regroup_convs`)."""
    fields = _discover_fields(g, model, x)
    by_field = {layer: w for layer, w in widths.items() if layer in fields}
    rest = {layer: w for layer, w in widths.items() if layer not in fields}
    new_model = _rebuild_by_fields(g, model, by_field, fields) if by_field else model
    new_model = _intercepted(g, new_model, rest, x) if rest else new_model
    return _regroup_convs(g, new_model, x, leaves)


def _regroup_convs(g: Graph, model, x, leaves: Sequence[Array]) -> Any:
    """``model`` with the fields of every grouped or depthwise convolution whose kernel does not have its shrunk
    shape yet set by interception: of the submodule's integer fields holding an old size (input or output channels,
    ``feature_group_count``; :func:`jaxprune.graph.convs.conv_sizes`), the fewest whose new values give the
    kernel its shrunk shape (so a stride equal to an old group count is left alone)."""
    import itertools

    from jaxprune.graph.convs import conv_sizes

    n = g.net

    def fits(m, path) -> bool:
        try:
            return not _mismatch(n, m, leaves, x, under=path)
        except Exception:  # a candidate the module refuses (a group count that does not divide the channels)
            return False

    for path, sizes in conv_sizes(g, leaves).items():
        if all(o == w for o, w in sizes.items()) or fits(model, path):
            continue
        key = tuple(path.split("/"))
        now = _module_fields(n, model, x).get(key, {})
        held = [f for f, v in now.items() if isinstance(v, int) and sizes.get(v, v) != v]
        tries = (_with_overrides(model, {key: {f: sizes[now[f]] for f in fs}})
                for r in range(1, len(held) + 1) for fs in itertools.combinations(held, r))
        model = next((m for m in tries if fits(m, path)), model)
    return model


def _rebuild_by_fields(g: Graph, model, widths: Mapping[str, int], fields: Mapping[str, tuple]) -> Any:
    updates: dict[str, Any] = {}
    for layer, w in widths.items():
        field, idx, group = fields[layer]
        others = [m for m in group if m != layer]
        for m in others:
            if widths.get(m, g.layers[m].units) != w and m not in widths:
                raise ValueError(f"model: layer {layer!r} shares its width field {field!r} with {others}; shrink "
                                 "them to the same width together")
        cur = updates.get(field, getattr(model, field))
        if idx is None:
            updates[field] = int(w)
        else:
            seq = list(cur)
            seq[idx] = int(w)
            updates[field] = type(cur)(seq) if isinstance(cur, tuple) else seq
    return model.clone(**updates)


_FIELD_CACHE: dict = {}


def _discover_fields(g: Graph, model, x) -> dict:
    """``{layer: (field, index, layers sharing it)}`` found by perturbing each integer width field by one."""
    key = (model, tuple(np.shape(x)))
    try:
        if key in _FIELD_CACHE:
            return _FIELD_CACHE[key]
    except TypeError:
        key = None
    n = g.net
    spec = jnp.zeros(tuple(np.shape(x)), jnp.float32)
    kernel_paths = {name: n.paths[l.kernel] for name, l in g.layers.items()}

    def units(m) -> dict:
        try:
            shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), spec, **dict(n.call_kwargs)))
        except Exception:
            return {}
        flat = {_path_str(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(shapes)}
        return {name: flat.get(p, (None,))[g.layers[name].out_axis] if p in flat else None
                for name, p in kernel_paths.items()}

    base = {name: l.units for name, l in g.layers.items()}
    found: dict = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
        cands = []
        if isinstance(v, int) and not isinstance(v, bool):
            cands.append((None, v + 1))
        elif isinstance(v, (tuple, list)) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            for i in range(len(v)):
                seq = list(v)
                seq[i] += 1
                cands.append((i, type(v)(seq)))
        for idx, new in cands:
            try:
                got = units(model.clone(**{f.name: new}))
            except Exception:
                continue
            changed = [name for name in base if got.get(name) is not None and got[name] == base[name] + 1]
            rest_same = all(got.get(name) in (base[name], base[name] + 1) for name in base)
            if changed and rest_same:
                for name in changed:
                    found.setdefault(name, (f.name, idx, tuple(changed)))
    if key is not None:
        _FIELD_CACHE[key] = found
    return found



# ----------------------------------------------------------------------------------------------- interception
def _is_width(v: Any) -> bool:
    ints = lambda t: isinstance(t, (int, np.integer)) and not isinstance(t, bool)
    return ints(v) or (isinstance(v, tuple) and bool(v) and all(ints(t) for t in v))


def _intercepted(g: Graph, model, widths: Mapping[str, int], x) -> Any:
    """``model`` rebuilt with ``widths: {layer: units}`` set on its submodules by interception (module docstring).

    Overrides accumulate: a model rebuilt this way and shrunk again keeps one subclass of the original class."""
    n = g.net
    overrides: dict[tuple, dict] = {}
    seen = _module_fields(n, model, x)
    for layer, w in widths.items():
        l = g.layers[layer]
        path = tuple(p for p in n.module_path(l.kernel).split("/") if p)
        old = int(np.shape(n.leaves[l.kernel])[l.out_axis])
        found = [(f, v) for f, v in seen.get(path, {}).items() if v == old or (isinstance(v, tuple) and old in v)]
        if w == old:
            continue
        if not path or len(found) != 1:
            why = ("its width is not a field of a submodule" if not path or path not in seen else
                   f"{'no' if not found else 'more than one'} integer field of module {'/'.join(path)!r} holds "
                   f"its width {old}" + (f" ({', '.join(f for f, _ in found)})" if found else ""))
            raise ValueError(
                f"model: cannot rebuild {type(model).__name__} with layer {layer!r} of width {w}: {why}. Contract "
                "for user models: a `with_widths(widths: dict[str, int]) -> Module` method, an integer (or "
                "tuple-of-integer) width field per layer (e.g. `hidden: Sequence[int]`), or layers whose width is "
                "a field of their own module (`nn.Dense(48)`); NNX models need none (pass nnx.split's "
                "(graphdef, state))")
        f, v = found[0]
        overrides.setdefault(path, {})[f] = int(w) if not isinstance(v, tuple) else tuple(
            int(w) if t == old else t for t in v)
    return _with_overrides(model, overrides)


def _with_overrides(model, extra: Mapping[tuple, dict]) -> Any:
    """``model`` as an instance of its base class's intercepting subclass whose overrides are the model's own with
    ``extra: {scope path: {field: value}}`` merged in (:func:`_resized_class`)."""
    base = getattr(type(model), "_jaxprune_base", type(model))
    overrides = {p: dict(f) for p, f in getattr(type(model), "_jaxprune_overrides", ())}
    for p, f in extra.items():
        overrides.setdefault(p, {}).update(f)
    frozen = tuple(sorted((p, tuple(sorted(f.items()))) for p, f in overrides.items()))
    kwargs = {fl.name: getattr(model, fl.name) for fl in dataclasses.fields(model) if fl.name not in ("parent", "name")}
    return _resized_class(base, frozen)(**kwargs)


@functools.lru_cache(maxsize=None)
def _resized_class(base: type, overrides: tuple) -> type:
    """A subclass of ``base`` (same name) whose ``__call__`` runs under an interceptor setting ``overrides``:
    ``((scope path, ((field, value), …)), …)``."""
    import flax.linen as nn

    table = {p: dict(f) for p, f in overrides}

    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(functools.partial(_set_widths, table)):
            return base.__call__(self, *args, **kwargs)

    return type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                         "__qualname__": base.__qualname__, "__doc__": base.__doc__,
                                         "_jaxprune_base": base, "_jaxprune_overrides": overrides})


def _set_widths(table: Mapping[tuple, dict], next_fun, args, kwargs, context):
    """Interceptor: while a method of the module at a scope path in ``table`` runs, its fields hold the new widths."""
    m = context.module
    new = table.get(tuple(m.scope.path)) if m.scope is not None else None
    if not new:
        return next_fun(*args, **kwargs)
    old = {f: getattr(m, f) for f in new}
    for f, v in new.items():
        object.__setattr__(m, f, v)
    try:
        return next_fun(*args, **kwargs)
    finally:
        for f, v in old.items():
            object.__setattr__(m, f, v)


def _module_fields(n, model, x) -> dict[tuple, dict]:
    """``{scope path: {field: integer or tuple-of-integer value}}`` of every submodule the model calls (the values
    in effect, overrides of an already rebuilt model included), read by intercepting one abstract ``init``."""
    import flax.linen as nn

    over = {p: dict(f) for p, f in getattr(type(model), "_jaxprune_overrides", ())}
    seen: dict[tuple, dict] = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        path = tuple(m.scope.path) if m.scope is not None else None
        if path and path not in seen:
            vals = {fl.name: getattr(m, fl.name) for fl in dataclasses.fields(m)
                    if fl.name not in ("parent", "name") and _is_width(getattr(m, fl.name))}
            seen[path] = {**vals, **over.get(path, {})}
        return next_fun(*args, **kwargs)

    spec = jnp.zeros(tuple(np.shape(x)), jnp.result_type(x) if not isinstance(x, jax.ShapeDtypeStruct) else x.dtype)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec, **dict(n.call_kwargs)))
    return seen


# ----------------------------------------------------------------------------------------------- NNX
def _rebuild_nnx(g: Graph, leaves: Sequence[Array]) -> tuple[Any, PyTree]:
    """``nnx.split`` of the model merged with the shrunk ``leaves``, with consistent attributes: every module
    holding shrunk parameters gets the integer (or tuple) attributes that held an old size (or a prefix, suffix or
    the whole of an old shape) of its parameters set to the new ones (:func:`_fix_widths`: ``in_features``,
    ``out_features``, ``num_features``, ``LinearGeneral``'s tuples); then every module holding no parameter of its
    own but shrunk ones below it (``nnx.MultiHeadAttention``: ``num_heads``, ``qkv_features``, ``head_dim``), and
    every grouped or depthwise convolution (``in_features``, ``feature_group_count``), gets the attribute values its
    constructor needs to make the shrunk shapes (:func:`_fix_parent`, :func:`_fit_attrs`)."""
    from jaxprune.graph.convs import conv_sizes
    from flax import nnx

    n = g.net
    module = nnx.merge(n.model, n.with_leaves(leaves))
    ids = {(leaf, axis): ("unit", np.asarray(u).tobytes()) for leaf, axis, u in g.slices}
    by_module: dict[str, list[int]] = {}
    for i, p in enumerate(n.paths):
        by_module.setdefault(p.rpartition("/")[0], []).append(i)
    mods = [(tuple(map(str, path)), m) for path, m in nnx.iter_graph(module) if isinstance(m, nnx.Module)]
    before = {id(m): _width_attrs(m) for _, m in mods}
    for path, m in mods:
        own = by_module.get("/".join(path))
        if own:
            axes = [(ids.get((i, a), ("fixed", int(old))), int(old), int(np.shape(leaves[i])[a]), n.paths[i],
                     len(np.shape(leaves[i]))) for i in own for a, old in enumerate(np.shape(n.leaves[i]))]
            _fix_widths(m, axes)
    regroup = conv_sizes(g, leaves)
    for path, m in mods:
        sizes = regroup.get("/".join(path), {})
        if any(o != w for o, w in sizes.items()):
            _fit_attrs(m, {o: {w} for o, w in sizes.items() if o != w})
    for path, m in sorted(mods, key=lambda t: -len(t[0])):  # innermost first
        below = [c for p, c in mods if len(p) > len(path) and p[:len(path)] == path]
        if "/".join(path) not in by_module and any(_width_attrs(c) != before[id(c)] for c in below):
            _fix_parent(m, [(before[id(c)], _width_attrs(c)) for c in below])
    return nnx.split(module)


def _width_attrs(m: Any) -> dict[str, Any]:
    """A module's public integer and tuple-of-integer attributes."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and _is_width(v)}


def _fix_widths(m: Any, axes: Sequence[tuple]) -> None:
    """Set ``m``'s integer attributes to its parameters' new sizes. ``axes``: ``(identity, old size, new size,
    leaf path, ndim)`` per parameter axis (one identity per set of units: a kernel's output axis and its bias share
    one; axes no unit indexes share one per size). Per old size ``o``: the attributes equal to ``o`` (in the order
    the module holds them) take the new sizes of the identities of size ``o`` (ordered by the parameters, most axes
    first, then axis: a kernel's input before its output) one to one; with a different number of each, a single
    attribute takes a single new size. A tuple attribute equal to a parameter's old shape, or to a leading or
    trailing run of it, takes the new sizes of those axes (``kernel_shape``; ``LinearGeneral``'s ``in_features`` /
    ``out_features``: where one tuple is both, the first attribute takes the leading run, later ones the trailing)."""
    axes = sorted(axes, key=lambda t: (-t[4], t[3]))
    sizes: dict[int, dict] = {}
    shapes: dict[str, list] = {}
    for ident, old, new, path, _ in axes:
        sizes.setdefault(old, {}).setdefault(ident, new)
        shapes.setdefault(path, []).append((old, new))
    attrs = [(k, v) for k, v in vars(m).items() if not k.startswith("_")]
    _fix_tuples(m, [(k, v) for k, v in attrs if isinstance(v, tuple) and _is_width(v)], list(shapes.values()))
    ints = [(k, v) for k, v in attrs if isinstance(v, int) and not isinstance(v, bool)]
    for old, idents in sizes.items():
        news = list(idents.values())
        if all(w == old for w in news):
            continue
        held = [k for k, v in ints if v == old]
        if len(held) == len(news):
            for k, w in zip(held, news):
                setattr(m, k, w)
        elif len(held) == 1 and len({w for w in news if w != old}) == 1:
            setattr(m, held[0], next(w for w in news if w != old))


def _fix_tuples(m: Any, attrs: Sequence[tuple], shapes: Sequence[list]) -> None:
    """:func:`_fix_widths` for tuple attributes: ``shapes`` lists ``[(old, new) per axis]`` per parameter."""
    leading_taken: set = set()
    for k, v in attrs:
        r = len(v)
        for i, dims in enumerate(shapes):
            old, new = tuple(o for o, _ in dims), tuple(w for _, w in dims)
            lead, trail = r <= len(old) and old[:r] == v, r <= len(old) and old[len(old) - r:] == v
            if not (lead or trail):
                continue
            if lead and trail and r < len(old):
                lead = i not in leading_taken
                leading_taken.add(i)
            pick = new[:r] if lead else new[len(new) - r:]
            if pick != v:
                setattr(m, k, pick)
            break


def _fix_parent(m: Any, changes: Sequence[tuple]) -> None:
    """Set the integer attributes of ``m`` (a module holding no parameter of its own) to the values its
    constructor needs to build the shapes its submodules now hold. ``changes``: ``(old attributes, new
    attributes)`` of the modules below. Candidates for an attribute holding ``v``: the new values of the changed
    sizes (or products of a changed tuple) that were ``v``; the fewest changes whose abstract construction
    (``type(m)(**attributes)``, :func:`flax.nnx.eval_shape`) gives every state shape of ``m`` win. A module whose
    constructor cannot be called from its attributes is left as it is."""
    facts: dict[int, set] = {}
    for old, new in changes:
        for k, o in old.items():
            w = new.get(k, o)
            pairs = [(o, w)] if isinstance(o, int) else list(zip(o, w)) + [(int(np.prod(o)), int(np.prod(w)))]
            for a, b in pairs:
                if a != b:
                    facts.setdefault(a, set()).add(b)
    _fit_attrs(m, facts)


def _fit_attrs(m: Any, facts: Mapping[int, set]) -> None:
    """Set the fewest integer attributes of ``m`` holding an old size of ``facts: {old: {new sizes}}`` to a new
    one such that ``type(m)`` built abstractly from its attributes has ``m``'s state shapes (at most 64 tries;
    left as it is when none fits or the constructor cannot be called from the attributes)."""
    import itertools

    ints = {k: v for k, v in _width_attrs(m).items() if isinstance(v, int)}
    options = [(k, sorted(facts[v])) for k, v in ints.items() if v in facts]
    target = _state_shapes(m) if options else None
    if target is None:
        return
    tries = 0
    for r in range(1, len(options) + 1):
        for chosen in itertools.combinations(options, r):
            for values in itertools.product(*(c for _, c in chosen)):
                tries += 1
                if tries > 64:
                    return
                built = _built_like(m, dict(zip((k for k, _ in chosen), values)))
                if built is not None and _state_shapes(built) == target:
                    for k, v in _width_attrs(m).items():
                        if getattr(built, k, v) != v:
                            setattr(m, k, getattr(built, k))
                    return


def _state_shapes(m: Any) -> dict | None:
    from flax import nnx

    try:
        flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m)))
    except Exception:
        return None
    return {_path_str(p): tuple(np.shape(a)) if not hasattr(a, "shape") else tuple(a.shape) for p, a in flat}


def _built_like(m: Any, changed: Mapping[str, int]) -> Any:
    """An abstract ``type(m)`` built from ``m``'s attributes (those its constructor names) with ``changed``;
    ``None`` when the constructor needs an argument ``m`` does not hold or refuses the values."""
    import inspect

    from flax import nnx

    try:
        params = inspect.signature(type(m).__init__).parameters
    except (TypeError, ValueError):
        return None
    kw: dict[str, Any] = {}
    for name, p in list(params.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in changed:
            kw[name] = changed[name]
        elif name == "rngs":
            kw[name] = None
        elif name in vars(m) and not isinstance(vars(m)[name], (nnx.Module, nnx.Variable)):
            kw[name] = vars(m)[name]
        elif p.default is p.empty:
            return None
    try:
        return nnx.eval_shape(lambda: type(m)(**{k: (nnx.Rngs(0) if k == "rngs" else v) for k, v in kw.items()}))
    except Exception:
        return None
