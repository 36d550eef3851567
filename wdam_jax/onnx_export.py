"""Converts a jax function with a symbolic batch dimension into an ONNX model (opset 17).

The route is jaxpr -> ONNX: :func:`to_onnx` traces ``fn`` with ``jax.make_jaxpr`` on an input
whose batch dimension is the symbol ``b`` (as ``jax.export`` does) and writes one ONNX node, or a
few, per primitive. Higher-order primitives (``jit``, ``custom_jvp_call``, ...) are inlined,
``scan`` becomes ONNX ``Scan``, and every equation whose inputs are all known at conversion time
(the Haar kernels, index arithmetic, the resize weights) is evaluated once with jax and stored as
an initialiser, so the graph holds only what depends on the images. Why not tf2onnx or jax2onnx
is in WORKSPACE.md ("ONNX export").

Shapes: a dimension is an ``int`` or a ``_DimExpr`` in ``b`` (``k * b + c``); a target shape with
one such dimension is written with ``-1`` there, one with more is computed at run time from the
input's batch size (``Shape``). ``Reshape`` never uses ``allowzero``.

Only the primitives the registered methods' inference functions use (plus their close relatives)
are converted; any other raises :class:`UnsupportedPrimitiveError` naming it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend import core as jcore
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INT64_MAX = np.iinfo(np.int64).max
BATCH = "batch"  # the ONNX dim_param of the batch dimension

_CALLS = {  # higher-order primitives inlined, with the parameter holding the called jaxpr
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_lin": None,
}
_IDENTITY = {"stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision"}
_UNARY = {
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "sqrt": "Sqrt",
    "abs": "Abs",
    "neg": "Neg",
    "sign": "Sign",
    "floor": "Floor",
    "ceil": "Ceil",
    "logistic": "Sigmoid",
    "erf": "Erf",
    "sin": "Sin",
    "cos": "Cos",
    "not": "Not",
}
_BINARY = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
    "gt": "Greater",
    "ge": "GreaterOrEqual",
    "lt": "Less",
    "le": "LessOrEqual",
    "eq": "Equal",
    "and": "And",
    "or": "Or",
    "xor": "Xor",
}
# Reductions whose axes are an attribute at opset 17 (ReduceSum's are an input since 13).
_REDUCE_ATTR = {"reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd"}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive (or a form of one) this converter does not write."""


def _onnx_dtype(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _is_const_dim(d) -> bool:
    return isinstance(d, int | np.integer)


def _linear(d) -> tuple[int, int]:
    """``(k, c)`` with ``d == k * b + c`` for a symbolic dimension ``d``."""
    value = lambda n: int(d._evaluate({"b": n}))
    c, k = value(0), value(1) - value(0)
    if any(value(n) != k * n + c for n in (2, 7, 33)):
        raise UnsupportedPrimitiveError(f"dimension {d} is not linear in the batch size")
    return k, c


class _Graph:
    """Nodes and initialisers of one ONNX graph; initialisers go to the top-level graph."""

    def __init__(self, parent: _Graph | None = None, batch: str | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers = parent.initializers if parent else []
        self._counter = parent._counter if parent else itertools.count()
        self._consts = parent._consts if parent else {}
        self.batch = batch  # name of the int64 [1] batch size tensor, or None

    def fresh(self, hint: str = "v") -> str:
        return f"{hint}_{next(self._counter)}"

    def const(self, value: np.ndarray) -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.size <= 64 else id(value)
        if key not in self._consts:
            name = self.fresh("c")
            self.initializers.append(numpy_helper.from_array(value, name))
            self._consts[key] = (name, value)  # keeps value alive: id() stays unique
        return self._consts[key][0]

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> Any:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(values, np.int64))

    def dim(self, d) -> str:
        """An int64 [1] tensor holding dimension ``d``."""
        if _is_const_dim(d):
            return self.ints([int(d)])
        k, c = _linear(d)
        out = self.batch if k == 1 else self.op("Mul", [self.batch, self.ints([k])])
        return out if c == 0 else self.op("Add", [out, self.ints([c])])

    def target_shape(self, shape: Sequence) -> str:
        """A Reshape/Expand target for ``shape``: constant, with ``-1`` for a single symbolic
        dimension, else computed from the batch size."""
        symbolic = [i for i, d in enumerate(shape) if not _is_const_dim(d)]
        if not symbolic:
            return self.ints([int(d) for d in shape])
        if len(symbolic) == 1:
            return self.ints([-1 if i in symbolic else int(d) for i, d in enumerate(shape)])
        return self.op("Concat", [self.dim(d) for d in shape], axis=0)

    def expand_shape(self, shape: Sequence) -> str:
        if all(_is_const_dim(d) for d in shape):
            return self.ints([int(d) for d in shape])
        return self.op("Concat", [self.dim(d) for d in shape], axis=0)


def _value_info(name: str, aval, batch_symbol: str = BATCH) -> onnx.ValueInfoProto:
    dims = [int(d) if _is_const_dim(d) else batch_symbol for d in aval.shape]
    return helper.make_tensor_value_info(name, _onnx_dtype(aval.dtype), dims)


class _Converter:
    """Walks one jaxpr, writing its equations into ``graph``."""

    def __init__(self, graph: _Graph):
        self.g = graph
        self.env: dict[Any, Any] = {}  # Var -> np.ndarray (known) or str (ONNX tensor name)

    # -- values
    def read(self, atom) -> Any:
        if isinstance(atom, jcore.Literal):
            return np.asarray(atom.val, dtype=atom.aval.dtype)
        return self.env[atom]

    def name(self, atom) -> str:
        value = self.read(atom)
        return value if isinstance(value, str) else self.g.const(value)

    def run(self, jaxpr: jcore.Jaxpr, consts: Sequence, args: Sequence) -> list:
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            self.env[var] = value if isinstance(value, str) else np.asarray(value)
        for var, value in zip(jaxpr.invars, args, strict=True):
            self.env[var] = value
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn)
            for var, value in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jcore.DropVar):
                    self.env[var] = value
        return [self.read(v) for v in jaxpr.outvars]

    # -- equations
    def eqn(self, eqn) -> list:
        prim = eqn.primitive.name
        if prim in _CALLS:
            return self._inline(eqn)
        if all(_is_empty(v.aval) for v in eqn.outvars):  # jnp.pad's zero-width edges
            return [_EMPTY] * len(eqn.outvars)
        if prim == "concatenate":  # zero-size operands contribute nothing
            eqn = eqn.replace(invars=[v for v in eqn.invars if self.read(v) is not _EMPTY])
        values = [self.read(v) for v in eqn.invars]
        if any(v is _EMPTY for v in values):
            raise UnsupportedPrimitiveError(f"a zero-size operand of {prim}: {eqn}")
        concrete_out = all(
            all(_is_const_dim(d) for d in getattr(v.aval, "shape", ())) for v in eqn.outvars
        )
        if prim != "scan" and concrete_out and not any(isinstance(v, str) for v in values):
            out = eqn.primitive.bind(*values, **eqn.params)  # known now: fold into a constant
            out = out if eqn.primitive.multiple_results else [out]
            return [np.asarray(o) for o in out]
        names = [self.name(v) for v in eqn.invars]
        if prim in _IDENTITY:
            return names
        handler = getattr(self, f"_{prim}", None)
        if prim in _UNARY:
            return [self.g.op(_UNARY[prim], names)]
        if prim in ("sub", "max"):
            fused = self._fusable(prim, values, names)
            if fused is not None:
                return [fused]
        if prim in _BINARY:
            return [self.g.op(_BINARY[prim], names)]
        if prim in _REDUCE_ATTR:
            axes = list(eqn.params["axes"])
            return [self.g.op(_REDUCE_ATTR[prim], names, axes=axes, keepdims=0)]
        if handler is None:
            raise UnsupportedPrimitiveError(
                f"the ONNX export has no conversion for jax primitive {prim!r} ({eqn}); add one "
                "to wdam_jax/onnx_export.py or express the function without it."
            )
        out = handler(eqn, names)
        return out if isinstance(out, list) else [out]

    def _fusable(self, prim: str, values: list, names: list[str]) -> str | None:
        """The same value in the ops onnxruntime fuses into a preceding Conv (bias, scale,
        ReLU): ``x - c`` as ``x + (-c)`` and ``max(x, 0)`` as ``Relu(x)``, both exact."""
        x, c = values
        if prim == "sub" and isinstance(x, str) and not isinstance(c, str):
            if np.issubdtype(c.dtype, np.floating):
                return self.g.op("Add", [x, self.g.const(-c)])
        if prim == "max":
            tensor, other = (x, c) if isinstance(x, str) else (c, x)
            if isinstance(tensor, str) and not isinstance(other, str) and other.size == 1:
                if np.issubdtype(other.dtype, np.floating) and float(other) == 0.0:
                    return self.g.op("Relu", [tensor])
        return None

    def _inline(self, eqn) -> list:
        called = eqn.params.get(_CALLS[eqn.primitive.name] or "", None)
        if called is None:
            raise UnsupportedPrimitiveError(f"cannot inline {eqn.primitive.name}")
        if isinstance(called, jcore.ClosedJaxpr):
            jaxpr, consts = called.jaxpr, called.consts
        else:
            jaxpr, consts = called, []
        inner = _Converter(self.g)
        return inner.run(jaxpr, consts, [self.read(v) for v in eqn.invars])

    # -- shape and layout
    def _reshape(self, eqn, names):
        (x,) = names
        if eqn.params.get("dimensions") is not None:
            x = self.g.op("Transpose", [x], perm=list(eqn.params["dimensions"]))
        return self.g.op("Reshape", [x, self.g.target_shape(eqn.params["new_sizes"])])

    def _squeeze(self, eqn, names):
        return self.g.op("Squeeze", [names[0], self.g.ints(eqn.params["dimensions"])])

    def _expand_dims(self, eqn, names):
        return self.g.op("Unsqueeze", [names[0], self.g.ints(eqn.params["dimensions"])])

    def _transpose(self, eqn, names):
        return self.g.op("Transpose", names, perm=list(eqn.params["permutation"]))

    def _broadcast_in_dim(self, eqn, names):
        (x,) = names
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        in_shape = eqn.invars[0].aval.shape
        missing = [i for i in range(len(shape)) if i not in dims]
        if missing:
            x = self.g.op("Unsqueeze", [x, self.g.ints(missing)])
        aligned = [1] * len(shape)
        for i, d in zip(dims, in_shape, strict=True):
            aligned[i] = d
        if all(_same_dim(a, s) for a, s in zip(aligned, shape, strict=True)):
            return x if missing else self.g.op("Identity", [x])
        target = [1 if _same_dim(a, s) else s for a, s in zip(aligned, shape, strict=True)]
        return self.g.op("Expand", [x, self.g.expand_shape(target)])

    def _concatenate(self, eqn, names):
        if len(names) == 1:
            return self.g.op("Identity", names)
        return self.g.op("Concat", names, axis=int(eqn.params["dimension"]))

    def _stack(self, eqn, names):
        axis = int(eqn.params["axis"])
        parts = [self.g.op("Unsqueeze", [n, self.g.ints([axis])]) for n in names]
        return self.g.op("Concat", parts, axis=axis)

    def _split(self, eqn, names):
        sizes, axis = eqn.params["sizes"], int(eqn.params["axis"])
        return list(
            self.g.op("Split", [names[0], self.g.ints(sizes)], n_out=len(sizes), axis=axis)
        ) if len(sizes) > 1 else [self.g.op("Identity", names)]  # fmt: skip

    def _slice(self, eqn, names):
        shape = eqn.invars[0].aval.shape
        starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params["strides"] or (1,) * len(shape)
        axes, s, e, st = [], [], [], []
        for axis, (lo, hi, step, size) in enumerate(
            zip(starts, limits, strides, shape, strict=True)
        ):
            if _same_dim(lo, 0) and _same_dim(hi, size) and step == 1:
                continue
            axes.append(axis)
            s.append(lo)
            e.append(INT64_MAX if _same_dim(hi, size) else hi)  # a symbolic end may be full
            st.append(int(step))
        if not axes:
            return self.g.op("Identity", names)
        bounds = [self.g.expand_shape(s), self.g.expand_shape(e)]
        return self.g.op("Slice", [names[0], *bounds, self.g.ints(axes), self.g.ints(st)])

    def _dynamic_slice(self, eqn, names):
        x, *starts = names
        sizes = eqn.params["slice_sizes"]
        shape = eqn.invars[0].aval.shape
        known = [self.read(v) for v in eqn.invars[1:]]
        axes, lo, hi = [], [], []
        for axis, (start, size, dim) in enumerate(zip(starts, sizes, shape, strict=True)):
            if _same_dim(size, dim):
                continue
            if not (_is_const_dim(size) and _is_const_dim(dim)):
                raise UnsupportedPrimitiveError(f"dynamic_slice of a symbolic extent: {eqn}")
            axes.append(axis)
            value = known[axis]
            if not isinstance(value, str):  # a known start, clamped as XLA does
                begin = self.g.ints([int(np.clip(value, 0, dim - size))])
            else:
                begin = self.g.op("Cast", [start], to=TensorProto.INT64)
                begin = self.g.op("Reshape", [begin, self.g.ints([1])])
                begin = self.g.op("Max", [self.g.op("Min", [begin, self.g.ints([dim - size])]),
                                          self.g.ints([0])])  # fmt: skip
            lo.append(begin)
            hi.append(self.g.op("Add", [begin, self.g.ints([size])]))
        if not axes:
            return self.g.op("Identity", [x])
        begin = lo[0] if len(lo) == 1 else self.g.op("Concat", lo, axis=0)
        end = hi[0] if len(hi) == 1 else self.g.op("Concat", hi, axis=0)
        return self.g.op("Slice", [x, begin, end, self.g.ints(axes)])

    def _gather(self, eqn, names):
        """Only the form jnp's static indexing produces: one point, known indices."""
        dn = eqn.params["dimension_numbers"]
        operand = eqn.invars[0].aval
        indices = self.read(eqn.invars[1])
        sizes = eqn.params["slice_sizes"]
        out_rank = len(eqn.outvars[0].aval.shape)
        point = (
            not isinstance(indices, str)
            and indices.ndim == 1
            and tuple(dn.offset_dims) == tuple(range(out_rank))
            and not dn.operand_batching_dims
        )
        if not point:
            return self._take(eqn, names)
        start = dict(zip(dn.start_index_map, (int(i) for i in indices), strict=True))
        axes, s, e = [], [], []
        for axis, (size, dim) in enumerate(zip(sizes, operand.shape, strict=True)):
            if axis not in start and _same_dim(size, dim):
                continue
            if not (_is_const_dim(size) and _is_const_dim(dim)):
                raise UnsupportedPrimitiveError(f"gather of a symbolic extent: {eqn}")
            begin = int(np.clip(start.get(axis, 0), 0, dim - size))
            axes.append(axis)
            s.append(begin)
            e.append(begin + int(size))
        x = names[0]
        if axes:
            x = self.g.op("Slice", [x, self.g.ints(s), self.g.ints(e), self.g.ints(axes)])
        if dn.collapsed_slice_dims:
            x = self.g.op("Squeeze", [x, self.g.ints(dn.collapsed_slice_dims)])
        return x

    def _take(self, eqn, names):
        """``operand[indices]`` along one axis (jnp.take, ``bank[nearest]``): ONNX Gather."""
        dn = eqn.params["dimension_numbers"]
        operand = eqn.invars[0].aval
        index_shape = eqn.invars[1].aval.shape
        rank, nb = len(operand.shape), len(index_shape) - 1
        axes = tuple(dn.start_index_map)
        layout = None
        if len(axes) == 1 and tuple(dn.collapsed_slice_dims) == axes and index_shape[-1] == 1:
            (a,) = axes
            full = all(
                _same_dim(size, 1 if i == a else dim)
                for i, (size, dim) in enumerate(
                    zip(eqn.params["slice_sizes"], operand.shape, strict=True)
                )
            )
            layout = (*range(a), *range(a + nb, nb + rank - 1)) if full else None
        if dn.operand_batching_dims or layout != tuple(dn.offset_dims):
            raise UnsupportedPrimitiveError(f"gather other than a take along one axis: {eqn}")
        index = self.g.op("Squeeze", [names[1], self.g.ints([nb])])
        index = self.g.op("Cast", [index], to=TensorProto.INT64)
        return self.g.op("Gather", [names[0], index], axis=int(axes[0]))

    def _pad(self, eqn, names):
        config = eqn.params["padding_config"]
        if any(interior != 0 or lo < 0 or hi < 0 for lo, hi, interior in config):
            raise UnsupportedPrimitiveError(f"pad with interior or negative padding: {eqn}")
        pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
        return self.g.op("Pad", [names[0], self.g.ints(pads), names[1]], mode="constant")

    def _iota(self, eqn, names):
        shape, dim, dtype = eqn.params["shape"], eqn.params["dimension"], eqn.params["dtype"]
        n = shape[dim]
        if _is_const_dim(n):
            out = self.g.const(np.arange(int(n), dtype=dtype))
        else:
            count = self.g.op("Squeeze", [self.g.dim(n), self.g.ints([0])])
            zero, one = np.zeros((), np.int64), np.ones((), np.int64)
            out = self.g.op("Range", [self.g.const(zero), count, self.g.const(one)])
            out = self.g.op("Cast", [out], to=_onnx_dtype(dtype))
        if len(shape) == 1:
            return out
        others = [i for i in range(len(shape)) if i != dim]
        out = self.g.op("Unsqueeze", [out, self.g.ints(others)])
        return self.g.op("Expand", [out, self.g.expand_shape(shape)])

    # -- elementwise with a twist
    def _rsqrt(self, eqn, names):
        return self.g.op("Reciprocal", [self.g.op("Sqrt", names)])

    def _square(self, eqn, names):
        return self.g.op("Mul", [names[0], names[0]])

    def _integer_pow(self, eqn, names):
        y = int(eqn.params["y"])
        if y == 2:
            return self.g.op("Mul", [names[0], names[0]])
        dtype = eqn.invars[0].aval.dtype
        return self.g.op("Pow", [names[0], self.g.const(np.asarray(y, dtype))])

    def _round(self, eqn, names):
        if int(eqn.params["rounding_method"]) == 1:  # to nearest even, as ONNX Round
            return self.g.op("Round", names)
        half = self.g.const(np.asarray(0.5, eqn.invars[0].aval.dtype))
        away = self.g.op("Floor", [self.g.op("Add", [self.g.op("Abs", names), half])])
        return self.g.op("Mul", [self.g.op("Sign", names), away])

    def _is_finite(self, eqn, names):
        nan_or_inf = self.g.op("Or", [self.g.op("IsNaN", names), self.g.op("IsInf", names)])
        return self.g.op("Not", [nan_or_inf])

    def _log1p(self, eqn, names):
        one = self.g.const(np.asarray(1, eqn.invars[0].aval.dtype))
        return self.g.op("Log", [self.g.op("Add", [names[0], one])])

    def _expm1(self, eqn, names):
        one = self.g.const(np.asarray(1, eqn.invars[0].aval.dtype))
        return self.g.op("Sub", [self.g.op("Exp", names), one])

    def _reduce_or(self, eqn, names, op="ReduceMax"):
        as_int = self.g.op("Cast", names, to=TensorProto.INT32)
        out = self.g.op(op, [as_int], axes=list(eqn.params["axes"]), keepdims=0)
        return self.g.op("Cast", [out], to=TensorProto.BOOL)

    def _reduce_and(self, eqn, names):
        return self._reduce_or(eqn, names, op="ReduceMin")

    def _ne(self, eqn, names):
        return self.g.op("Not", [self.g.op("Equal", names)])

    def _rem(self, eqn, names):
        return self.g.op("Mod", names, fmod=1)

    def _clamp(self, eqn, names):
        low, x, high = names
        return self.g.op("Max", [self.g.op("Min", [x, high]), low])

    def _convert_element_type(self, eqn, names):
        if np.dtype(eqn.params["new_dtype"]) == np.dtype(eqn.invars[0].aval.dtype):
            return self.g.op("Identity", names)
        return self.g.op("Cast", names, to=_onnx_dtype(eqn.params["new_dtype"]))

    def _select_n(self, eqn, names):
        pred, *cases = names
        if eqn.invars[0].aval.dtype != np.bool_:
            if len(cases) != 2:
                raise UnsupportedPrimitiveError(f"select_n with {len(cases)} cases: {eqn}")
            pred = self.g.op("Cast", [pred], to=TensorProto.BOOL)
        if len(cases) != 2:
            raise UnsupportedPrimitiveError(f"select_n with {len(cases)} cases: {eqn}")
        return self.g.op("Where", [pred, cases[1], cases[0]])

    # -- reductions
    def _reduce_sum(self, eqn, names):
        axes = list(eqn.params["axes"])
        if not axes:
            return self.g.op("Identity", names)
        return self.g.op("ReduceSum", [names[0], self.g.ints(axes)], keepdims=0)

    def _argmin(self, eqn, names, op="ArgMin"):
        (axis,) = eqn.params["axes"]
        out = self.g.op(op, names, axis=int(axis), keepdims=0)
        return self.g.op("Cast", [out], to=_onnx_dtype(eqn.params["index_dtype"]))

    def _argmax(self, eqn, names):
        return self._argmin(eqn, names, op="ArgMax")

    def _top_k(self, eqn, names):
        k = int(eqn.params["k"])
        values, indices = self.g.op("TopK", [names[0], self.g.ints([k])], n_out=2, axis=-1)
        dtype = eqn.outvars[1].aval.dtype
        return [values, self.g.op("Cast", [indices], to=_onnx_dtype(dtype))]

    def _sort(self, eqn, names):
        """Ascending along ``dimension`` by the first operand (TopK: ties keep index order)."""
        if eqn.params["num_keys"] != 1:
            raise UnsupportedPrimitiveError(f"sort with several keys: {eqn}")
        axis = int(eqn.params["dimension"])
        n = eqn.invars[0].aval.shape[axis]
        if not _is_const_dim(n):
            raise UnsupportedPrimitiveError(f"sort along the batch dimension: {eqn}")
        keys, *payloads = names
        values, order = self.g.op(
            "TopK", [keys, self.g.ints([int(n)])], n_out=2, axis=axis, largest=0, sorted=1
        )
        return [values, *(self.g.op("GatherElements", [p, order], axis=axis) for p in payloads)]

    def _reduce_window_max(self, eqn, names):
        return self._pool(eqn, names[0], "MaxPool")

    def _reduce_window_sum(self, eqn, names):
        return self._pool(eqn, names[0], "SumPool")

    def _reduce_window(self, eqn, names):
        body = eqn.params["jaxpr"]
        body = body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body
        (init,) = [self.read(v) for v in eqn.invars[1:]]
        kinds = [e.primitive.name for e in body.eqns]
        if kinds == ["add"] and not isinstance(init, str) and float(init) == 0.0:
            return self._pool(eqn, names[0], "SumPool")
        if kinds == ["max"] and not isinstance(init, str) and float(init) == -np.inf:
            return self._pool(eqn, names[0], "MaxPool")
        raise UnsupportedPrimitiveError(f"reduce_window with body {kinds}: {eqn}")

    def _pool(self, eqn, x, kind: str):
        p = eqn.params
        shape = eqn.invars[0].aval.shape
        out_shape = eqn.outvars[0].aval.shape
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if any(d != 1 for d in p.get("base_dilation", ())):
            raise UnsupportedPrimitiveError(f"pooling with base dilation: {eqn}")
        dilation = list(p.get("window_dilation", (1,) * len(shape)))
        pooled = [
            i for i in range(len(shape))
            if window[i] != 1 or strides[i] != 1 or tuple(padding[i]) != (0, 0)
        ]  # fmt: skip
        others = [i for i in range(len(shape)) if i not in pooled]
        perm = others + pooled
        if perm != list(range(len(shape))):
            x = self.g.op("Transpose", [x], perm=perm)
        flat = [1, -1, *(int(shape[i]) for i in pooled)]
        x = self.g.op("Reshape", [x, self.g.ints(flat)])
        attrs = dict(
            kernel_shape=[int(window[i]) for i in pooled],
            strides=[int(strides[i]) for i in pooled],
            pads=[int(padding[i][0]) for i in pooled] + [int(padding[i][1]) for i in pooled],
        )
        if kind == "MaxPool":
            x = self.g.op("MaxPool", [x], dilations=[dilation[i] for i in pooled], **attrs)
        else:
            if any(dilation[i] != 1 for i in pooled):
                raise UnsupportedPrimitiveError(f"sum pooling with dilation: {eqn}")
            x = self.g.op("AveragePool", [x], count_include_pad=1, **attrs)
            area = np.asarray(np.prod(attrs["kernel_shape"]), eqn.invars[0].aval.dtype)
            x = self.g.op("Mul", [x, self.g.const(area)])
        x = self.g.op("Reshape", [x, self.g.target_shape([out_shape[i] for i in perm])])
        if perm != list(range(len(shape))):
            x = self.g.op("Transpose", [x], perm=[int(i) for i in np.argsort(perm)])
        return x

    # -- linear algebra
    def _dot_general(self, eqn, names):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        a, b = names
        nl, nr = len(lhs.shape), len(rhs.shape)
        lb, rb, lc, rc = map(tuple, (lb, rb, lc, rc))
        nb = len(lb)
        batch_ok = lb == rb == tuple(range(nb))
        if batch_ok and lc == (nl - 1,) and nr == nb + 2 and rc in ((nb,), (nb + 1,)):
            if rc == (nb + 1,):  # rhs [..., N, K]
                known = self.read(eqn.invars[1])
                perm = [*range(nb), nb + 1, nb]
                b = (
                    self.g.const(np.ascontiguousarray(np.transpose(known, perm)))
                    if not isinstance(known, str)
                    else self.g.op("Transpose", [b], perm=perm)
                )
            if nb == 0 or nl == nb + 2:
                out = self.g.op("MatMul", [a, b])
                return self._cast_to(out, eqn)
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        left = [next(letters) for _ in range(nl)]
        right = [next(letters) for _ in range(nr)]
        for i, j in zip(lc + lb, rc + rb, strict=True):
            right[j] = left[i]
        out = (
            [left[i] for i in lb]
            + [left[i] for i in range(nl) if i not in lc + lb]
            + [right[j] for j in range(nr) if j not in rc + rb]
        )
        equation = f"{''.join(left)},{''.join(right)}->{''.join(out)}"
        return self._cast_to(self.g.op("Einsum", [a, b], equation=equation), eqn)

    def _cast_to(self, out: str, eqn) -> str:
        want, have = eqn.outvars[0].aval.dtype, eqn.invars[0].aval.dtype
        if np.dtype(want) != np.dtype(have):
            return self.g.op("Cast", [out], to=_onnx_dtype(want))
        return out

    def _conv_general_dilated(self, eqn, names):
        p = eqn.params
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise UnsupportedPrimitiveError(f"transposed or batch-grouped convolution: {eqn}")
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        x = self.g.op("Transpose", [names[0]], perm=list(lhs_spec))
        kernel = self.read(eqn.invars[1])
        if isinstance(kernel, str):
            w = self.g.op("Transpose", [kernel], perm=list(rhs_spec))
        else:
            w = self.g.const(np.ascontiguousarray(np.transpose(kernel, rhs_spec)))
        padding = [tuple(int(v) for v in pair) for pair in p["padding"]]
        y = self.g.op(
            "Conv",
            [x, w],
            strides=[int(s) for s in p["window_strides"]],
            pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
            dilations=[int(d) for d in p["rhs_dilation"]],
            group=int(p["feature_group_count"]),
        )
        y = self.g.op("Transpose", [y], perm=[int(i) for i in np.argsort(out_spec)])
        return self._cast_to(y, eqn)

    # -- control flow
    def _scan(self, eqn, names):
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        body = p["jaxpr"]
        invars = eqn.invars
        consts = [self.read(v) for v in invars[:n_consts]]
        carry_avals = [v.aval for v in invars[n_consts : n_consts + n_carry]]
        xs_avals = [v.aval for v in invars[n_consts + n_carry :]]
        if not xs_avals:
            raise UnsupportedPrimitiveError(f"scan without scanned inputs (a loop): {eqn}")
        sub = _Graph(self.g, batch=self.g.batch)
        inputs = []
        for aval in carry_avals:
            inputs.append(_value_info(sub.fresh("carry"), aval))
        for aval in xs_avals:
            sliced = jax.core.ShapedArray(aval.shape[1:], aval.dtype)
            inputs.append(_value_info(sub.fresh("x"), sliced))
        inner = _Converter(sub)
        # The body reads the outer graph's tensors by name (ONNX outer-scope references).
        outs = inner.run(body.jaxpr, body.consts, [*consts, *(vi.name for vi in inputs)])
        out_names = []
        for value, var in zip(outs, body.jaxpr.outvars, strict=True):
            name = value if isinstance(value, str) else sub.const(value)
            ident = sub.op("Identity", [name])  # a graph output must be a node's output
            out_names.append(_value_info(ident, var.aval))
        graph = helper.make_graph(sub.nodes, sub.fresh("scan_body"), inputs, out_names)
        direction = [1 if p["reverse"] else 0] * len(xs_avals)
        n_ys = len(eqn.outvars) - n_carry
        attrs = dict(body=graph, num_scan_inputs=len(xs_avals), scan_input_directions=direction)
        if n_ys:
            attrs["scan_output_directions"] = [1 if p["reverse"] else 0] * n_ys
        results = self.g.op("Scan", names[n_consts:], n_out=len(eqn.outvars), **attrs)
        return list(results) if isinstance(results, list) else [results]


_EMPTY = object()  # the value of a zero-size array (ONNX Reshape cannot make one without allowzero)


def _is_empty(aval) -> bool:
    return any(_is_const_dim(d) and int(d) == 0 for d in getattr(aval, "shape", ()))


def _same_dim(a, b) -> bool:
    if _is_const_dim(a) and _is_const_dim(b):
        return int(a) == int(b)
    if _is_const_dim(a) or _is_const_dim(b):
        return False
    return bool(a == b)


def _used_names(nodes) -> set[str]:
    used = set()
    for node in nodes:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(attr.g.node)
    return used


def to_onnx(
    fn: Callable,
    input_shape: Sequence[int],
    *,
    input_name: str = "images",
    output_names: Sequence[str] = ("image_scores", "maps"),
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """``fn(x [b, *input_shape[1:]] float32) -> outputs`` as an ONNX model with a dynamic batch.

    Args:
      fn: a jax function of one float32 array; ``input_shape[0]`` is ignored (the batch).
      input_shape: the input shape.
      input_name, output_names: the graph's input and output names.
      metadata: strings stored in the model's ``metadata_props``.

    Returns:
      The checked ``onnx.ModelProto`` (opset :data:`OPSET`).
    """
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, *input_shape[1:]), jnp.float32)
    closed = jax.make_jaxpr(fn)(spec)
    graph = _Graph()
    graph.batch = graph.op("Shape", [input_name], start=0, end=1)
    outs = _Converter(graph).run(closed.jaxpr, closed.consts, [input_name])
    if len(outs) != len(output_names):
        raise ValueError(f"fn returns {len(outs)} outputs, {len(output_names)} names given")
    outputs = []
    for value, var, out_name in zip(outs, closed.jaxpr.outvars, output_names, strict=True):
        name = value if isinstance(value, str) else graph.const(value)
        graph.nodes.append(helper.make_node("Identity", [name], [out_name]))
        outputs.append(_value_info(out_name, var.aval))
    used = _used_names(graph.nodes)  # inputs replaced by a transposed copy (conv kernels)
    onnx_graph = helper.make_graph(
        graph.nodes,
        "wdam_jax",
        [_value_info(input_name, spec)],
        outputs,
        initializer=[t for t in graph.initializers if t.name in used],
    )
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="wdam_jax",
        producer_version=jax.__version__,
    )
    model.ir_version = 8  # onnxruntime >= 1.14 reads it; opset 17 needs >= 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model)
    return model
