"""Public functions of the core document what they raise, and array functions their shapes and dtypes.

The rule (scikit-image's docstrings are the model): a public function or method of these modules
that can raise an exception, directly or through a function of its own module, names each such
exception after the word "Raises"; one that takes or returns an ndarray states a shape and a dtype.
An exception raised inside a ``try`` that catches it is not one the function raises.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re

import pytest

MODULES = [
    "gbm_assets.imaging.io",
    "gbm_assets.imaging.crops",
    "gbm_assets.imaging.measurements",
    "gbm_assets.imaging.plates",
    "gbm_assets.imaging.plate_import",
    "gbm_assets.imaging.cellprofiler",
    "gbm_assets.imaging.cellprofiler_masks",
    "gbm_assets.imaging.synthetic",
    "gbm_assets.models.augmentation",
    "gbm_assets.models.losses",
    "gbm_assets.models.encoders",
    "gbm_assets.models.variants",
    "gbm_assets.analysis.clustering",
    "gbm_assets.analysis.composition",
    "gbm_assets.analysis.truth",
    "gbm_assets.analysis.evaluation",
    "gbm_assets.analysis.explorer",
]
SHAPE = re.compile(r"\(\s*[\w*]+\s*,[^)]*\)|\bshape\b|\bscalar\b")
DTYPE = re.compile(
    r"\b(?:u?int(?:8|16|32|64)|float(?:16|32|64)|bool|complex\d*|dtype|object)\b"
    r"|\b(?:ndarray|array_like|tensors?) of (?:non-negative )?(?:int|float|real)\b"
)


def _exception_class(module, node: ast.expr) -> type[BaseException] | None:
    """The exception class a raise statement names (X or X(...)), if it names one of the module's."""
    target = node.func if isinstance(node, ast.Call) else node
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if not isinstance(target, ast.Name):
        return None
    obj = getattr(module, target.id, getattr(builtins, target.id, None))
    for attr in reversed(parts):
        obj = getattr(obj, attr, None)
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


class _Raises(ast.NodeVisitor):
    """Exceptions a function body raises and the module-level functions it calls, minus those caught."""

    def __init__(self, module):
        self.module, self.caught, self.raised, self.calls = module, [], set(), set()

    def visit_Try(self, node: ast.Try) -> None:
        handled = []
        for handler in node.handlers:
            if handler.type is None:
                handled.append(BaseException)
            for t in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
                if t is not None and (cls := _exception_class(self.module, t)) is not None:
                    handled.append(cls)
        self.caught.append(tuple(handled))
        for stmt in node.body:
            self.visit(stmt)
        self.caught.pop()
        for stmt in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(stmt)

    visit_TryStar = visit_Try

    def visit_Raise(self, node: ast.Raise) -> None:
        cls = _exception_class(self.module, node.exc) if node.exc is not None else None
        if cls is not None and not any(issubclass(cls, c) for handled in self.caught for c in handled):
            self.raised.add(cls)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and not self.caught:
            self.calls.add(node.func.id)
        self.generic_visit(node)

    def visit_FunctionDef(self, node) -> None:  # nested functions run when called, not here
        if node is self.root:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def run(self, node) -> _Raises:
        self.root = node
        self.visit(node)
        return self


def _raising(module, source: str | None = None) -> dict[str, set[type[BaseException]]]:
    """Public functions and methods -> the exceptions they raise, through the module's own functions too."""
    tree = ast.parse(source if source is not None else inspect.getsource(module))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    direct = {name: _Raises(module).run(node) for name, node in functions.items()}

    def closure(found: _Raises, seen: set[str]) -> set:
        out = set(found.raised)
        for callee in found.calls & direct.keys() - seen:
            out |= closure(direct[callee], seen | {callee})
        return out

    public = {name: closure(found, {name}) for name, found in direct.items() if not name.startswith("_")}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
        for meth in (n for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")):
            public[f"{cls.name}.{meth.name}"] = closure(_Raises(module).run(meth), set())
    return public


def _doc(module, qualname: str) -> str:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getdoc(obj) or ""


def _cases():
    for name in MODULES:
        module = importlib.import_module(name)
        for qualname, raised in sorted(_raising(module).items()):
            yield pytest.param(module, qualname, raised, id=f"{name.rsplit('.', 1)[1]}.{qualname}")


def _array_functions():
    for name in MODULES:
        module = importlib.import_module(name)
        for qualname, obj in inspect.getmembers(module, inspect.isfunction):
            if qualname.startswith("_") or obj.__module__ != name:
                continue
            annotations = " ".join(str(a) for a in obj.__annotations__.values())
            if "ndarray" in annotations:
                yield pytest.param(module, qualname, id=f"{name.rsplit('.', 1)[1]}.{qualname}")


@pytest.mark.parametrize(("module", "qualname", "raised"), list(_cases()))
def test_public_functions_name_the_exceptions_they_raise(module, qualname, raised):
    doc = _doc(module, qualname)
    after = doc.split("Raises", 1)[1] if "Raises" in doc else ""
    missing = sorted(cls.__name__ for cls in raised if not re.search(rf"\b{cls.__name__}\b", after))
    assert not missing, f"{module.__name__}.{qualname} raises {missing} but its docstring has no 'Raises' naming them"


@pytest.mark.parametrize(("module", "qualname"), list(_array_functions()))
def test_public_array_functions_state_shape_and_dtype(module, qualname):
    doc = _doc(module, qualname)
    assert SHAPE.search(doc), f"{module.__name__}.{qualname}: no shape such as (n, H, W) in its docstring"
    assert DTYPE.search(doc), f"{module.__name__}.{qualname}: no dtype in its docstring"


def test_the_checker_sees_raises_through_helpers_and_ignores_caught_ones():
    """The rule itself: a raise behind a helper counts, one caught in the same function does not."""
    import types

    source = '''
class Bad(ValueError):
    pass

def _helper(x):
    if x:
        raise Bad("x")

def through_helper(x):
    """Nothing said."""
    _helper(x)

def caught(x):
    """Nothing said."""
    try:
        raise KeyError(x)
    except LookupError:
        return None

def documented(x):
    """Does it.

    Raises
    ------
    KeyError
        Always.
    """
    raise KeyError(x)
'''
    module = types.ModuleType("checker_probe")
    exec(compile(source, "checker_probe", "exec"), module.__dict__)
    found = _raising(module, source)
    assert {k: {c.__name__ for c in v} for k, v in found.items()} == {
        "through_helper": {"Bad"},
        "caught": set(),
        "documented": {"KeyError"},
    }
