"""Static typing and documented-API contract: annotations users' type checkers read (regrad ships py.typed),
the README's Python versions, and the docstrings of the public API."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pathlib
import re
import sys
import typing
from typing import Any, Mapping

import pytest

import regrad
from regrad.specs import RegularizerSpec

PACKAGE = pathlib.Path(regrad.__file__).resolve().parent
ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout: tests/ (the package may be an installed wheel)


def _union_members(hint: Any) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)


def test_compose_base_loss_annotation_accepts_the_documented_dict() -> None:
    # docs/compose.md: `compose(base_loss={"fn": ce, "weight": 1.0, "name": "ce"})`; mypy/pyright refused the dict
    for fn in (regrad.compose, regrad.ComposedLoss.__init__):
        members = _union_members(typing.get_type_hints(fn)["base_loss"])
        assert Mapping[str, Any] in members, members
    loss_fn = regrad.compose(base_loss={"fn": regrad.losses.cross_entropy, "weight": 1.0, "name": "ce"})
    assert loss_fn.base_spec is not None and loss_fn.base_spec.name == "ce"


def test_numerical_return_type_declares_last_result() -> None:
    # docs/numerical.md: "`loss_fn.last_result` holds the last NumericalGrad"; a Callable[..., Any] has no such attribute
    returned = typing.get_type_hints(regrad.numerical)["return"]
    assert typing.get_type_hints(returned)["last_result"] == typing.Optional[regrad.NumericalGrad]
    wrapped = regrad.numerical(lambda data, lps: 0.0)
    assert wrapped.last_result is None


def test_numerical_grad_keeps_its_signature_for_type_checkers() -> None:
    # the inference-mode decorator returned Callable[..., NumericalGrad]: a typo'd keyword (methd=) type-checked
    numerical_module = sys.modules["regrad.numerical"]
    hints = typing.get_type_hints(numerical_module._outside_inference_mode)
    assert isinstance(hints["return"], typing.TypeVar) and hints["return"] is hints["engine"]
    assert "method" in inspect.signature(regrad.numerical_grad).parameters


@pytest.mark.parametrize("method", [RegularizerSpec.sync, RegularizerSpec.async_, RegularizerSpec.with_grad])
def test_spec_fn_type_accepts_any_data_annotation(method: Any) -> None:
    # a fn typed as Tinker types custom losses, fn(data: List[Datum], ...), was refused by type checkers:
    # a Callable whose first parameter is Sequence[Any] only takes fns that accept any Sequence
    params, _ = typing.get_args(typing.get_type_hints(method)["fn"])
    assert params[0] is Any


def test_client_loss_fn_type_accepts_tinker_typed_losses() -> None:
    pytest.importorskip("torch")
    hints = typing.get_type_hints(regrad.LocalTrainingClient.forward_backward_custom)
    params, _ = typing.get_args(hints["loss_fn"])
    assert params[0] is Any


def test_module_getattr_is_hidden_from_type_checkers() -> None:
    # a module-level __getattr__ -> Any makes mypy and pyright accept any misspelt `regrad.x` silently
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top_level = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "__getattr__" not in top_level
    guarded = [node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               and any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in node.body)]
    assert guarded
    with pytest.raises(AttributeError, match="no attribute 'numerical_gradd'"):
        regrad.numerical_gradd  # noqa: B018  (still a plain AttributeError at run time)


def test_readme_python_version_covers_the_pinned_requirements() -> None:
    # README: `make demo` / `make test` "need only python3 (3.X+)"; they install requirements/dev.txt
    from packaging.specifiers import SpecifierSet

    if not (ROOT / "README.md").is_file() or not (ROOT / "requirements" / "dev.txt").is_file():
        pytest.skip("not run from a checkout (no README.md / requirements/dev.txt next to tests/)")
    found = re.search(r"`python3` \((3\.\d+)\+", (ROOT / "README.md").read_text())
    assert found, "README states the Python version make demo / make test need"
    claimed = found.group(1)
    pinned = [line.split("#")[0].strip() for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines()]
    checked = 0
    for name in ("torch", "tinker"):
        if not any(re.match(rf"{name}\b", line) for line in pinned):
            continue
        try:
            requires = importlib.metadata.metadata(name)["Requires-Python"]
        except importlib.metadata.PackageNotFoundError:
            continue
        if requires:
            checked += 1
            assert SpecifierSet(requires).contains(claimed), f"{name} needs Python {requires}; README says {claimed}+"
    if not checked:
        pytest.skip("neither torch nor tinker is installed")


PUBLIC_MODULES = ["regrad", "regrad.kernels", "regrad.losses", "regrad.telemetry", "regrad.compose", "regrad.specs",
                  "regrad.data", "regrad.clients", "regrad.errors", "regrad._check", "regrad._futures", "regrad.model"]


def test_public_callables_and_properties_have_docstrings() -> None:
    pytest.importorskip("torch")
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if obj is None or inspect.ismodule(obj) or not callable(obj) or not getattr(obj, "__module__", "").startswith("regrad"):
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}")
            for attr, value in vars(obj).items() if inspect.isclass(obj) else ():
                if attr.startswith("_") and attr != "__call__":
                    continue
                raw = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if (isinstance(raw, property) or callable(raw)) and not (raw.__doc__ or "").strip():
                    missing.append(f"{module_name}.{name}.{attr}")
    assert not missing, missing
