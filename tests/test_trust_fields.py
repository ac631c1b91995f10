"""Every field a peer sends has a stated bound (issue #10): each header of every method of
every table (storage server, worker orders, master), each payload and each JSON field of
a JSON payload names what limits it (:class:`dsml.protocol.methods.Bound`), the bound
names real code, its numbers are that code's constants, its validator refuses a value
beyond it, and every JSON field docs/protocol.md lists for a method is among them.  A new
method, header or field without a bound fails here.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from dsml.protocol import limits, methods
from dsml.protocol.methods import (
    FIELD_BOUNDS,
    VALIDATOR_BOUNDS,
    Bound,
    HeaderValueError,
    MethodSpec,
    MethodTable,
    check_text,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: Every table a server parses requests with: what crosses a trust boundary.
TABLES = {
    "storage": methods.storage_methods,
    "orders": methods.worker_order_methods,
    "master": methods.master_methods,
}

#: Methods whose payload is opaque bytes (a stored file or value), bounded by length only.
OPAQUE = {"file_upload", "value_upload"}

KINDS = {"length", "range", "pattern", "count", "enum"}


def header_bound(spec: MethodSpec, header: str) -> Bound | None:
    """The bound of ``header`` in ``spec``: the spec's own statement, else its validator's
    (``check_text`` states none: it bounds by the framing's line alone)."""
    if header in spec.bounds:
        return spec.bounds[header]
    validator = spec.headers[header]
    if validator is check_text:
        return None
    return VALIDATOR_BOUNDS.get(getattr(validator, "__name__", ""))


def unbounded(table: MethodTable) -> list[str]:
    """What in ``table`` states no bound (empty when everything does)."""
    problems = []
    for spec in table.specs.values():
        for header in spec.headers:
            if header_bound(spec, header) is None:
                problems.append(f"{spec.name}: header {header!r} states no bound")
        if not 0 <= spec.max_payload <= limits.FILE_MAX:
            problems.append(f"{spec.name}: payload cap {spec.max_payload} out of range")
        if spec.max_payload > 0:
            if "payload" not in spec.bounds:
                problems.append(f"{spec.name}: payload states no bound")
            fields = [k for k in spec.bounds if k.startswith("payload.")]
            if spec.name not in OPAQUE and not fields:
                problems.append(f"{spec.name}: JSON payload states no field's bound")
        elif any(k.startswith("payload") for k in spec.bounds):
            problems.append(f"{spec.name}: bounds a payload it does not take")
        for name in spec.bounds:
            if not name.startswith("payload") and name not in spec.headers:
                problems.append(f"{spec.name}: bounds {name!r}, not one of its headers")
    return problems


def every_bound() -> list[tuple[str, str, Bound]]:
    """(method, field, bound) for every stated bound, validators' included."""
    found = [(m, f, b) for m, fields in FIELD_BOUNDS.items() for f, b in fields.items()]
    return found + [("*", name, b) for name, b in VALIDATOR_BOUNDS.items()]


def resolve(dotted: str) -> Any:
    """The object a dotted name names (a module, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_header_and_payload_of_every_method_states_its_bound(table: str) -> None:
    """Walk every method of the table: every header, the payload and a JSON payload's
    fields each have a stated bound."""
    built = TABLES[table]()
    assert built.specs
    assert unbounded(built) == []


def test_a_method_or_field_without_a_bound_is_caught() -> None:
    """The walk itself fails on a new text header, a new validator, a payload or a JSON
    payload without bounds, and a bound naming a header that does not exist."""

    def check_new(value: str) -> str:
        return value

    table = MethodTable()
    table.add(MethodSpec("fresh", {"note": check_text, "other": check_new}))
    table.add(MethodSpec("blob", max_payload=10))
    table.add(MethodSpec("jsonish", max_payload=10, bounds={"payload": Bound("length", "10")}))
    table.add(MethodSpec("stale", bounds={"gone": Bound("length", "1")}))
    assert unbounded(table) == [
        "fresh: header 'note' states no bound",
        "fresh: header 'other' states no bound",
        "blob: payload states no bound",
        "blob: JSON payload states no field's bound",
        "jsonish: JSON payload states no field's bound",
        "stale: bounds 'gone', not one of its headers",
    ]


@pytest.mark.parametrize("method,field,bound", every_bound(),
                         ids=[f"{m}.{f}" for m, f, _ in every_bound()])
def test_every_bound_is_well_formed_and_names_real_code(
    method: str, field: str, bound: Bound
) -> None:
    """A bound has a known kind and a rule; what it names exists; a number it states is
    the constant it names; an enum lists its values."""
    assert bound.kind in KINDS
    assert bound.rule.strip()
    if bound.kind == "enum":
        assert bound.values
    if bound.where:
        target = resolve(bound.where)
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            assert bound.limit == target, f"{bound.where} is {target}, the bound says {bound.limit}"
    if bound.limit is not None:
        assert bound.limit > 0


@pytest.mark.parametrize("name", sorted(VALIDATOR_BOUNDS))
def test_each_validator_refuses_a_value_beyond_its_bound(name: str) -> None:
    """Every header validator in use refuses the counterexample its bound states."""
    bound = VALIDATOR_BOUNDS[name]
    validators = {
        getattr(v, "__name__", ""): v
        for factory in TABLES.values()
        for spec in factory().specs.values()
        for v in spec.headers.values()
    }
    if name not in validators:
        pytest.skip(f"{name} is used by no method today")
    assert bound.refused is not None
    with pytest.raises(HeaderValueError):
        validators[name](bound.refused)


def test_every_validator_in_use_has_a_bound() -> None:
    """No method uses a validator (other than check_text, whose users state their own
    bound) that VALIDATOR_BOUNDS does not know."""
    used = {
        getattr(v, "__name__", repr(v))
        for factory in TABLES.values()
        for spec in factory().specs.values()
        for v in spec.headers.values()
        if v is not check_text
    }
    assert used - set(VALIDATOR_BOUNDS) == set()


def _documented_fields(method: str) -> set[str]:
    """The quoted JSON names in the rows of docs/protocol.md's tables for ``method``."""
    names: set[str] = set()
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if line.startswith("|") and f"`{method}`" in cells:
            names |= set(re.findall(r'"([a-z_]+)"', line))
    return names


def _json_methods() -> list[str]:
    return sorted({
        spec.name
        for factory in TABLES.values()
        for spec in factory().specs.values()
        if spec.max_payload > 0 and spec.name not in OPAQUE
    })


@pytest.mark.parametrize("method", _json_methods())
def test_every_documented_json_field_has_a_bound(method: str) -> None:
    """Each JSON field docs/protocol.md lists in a method's payload (or an enum value of
    one) is bounded on the spec."""
    spec = next(
        factory().specs[method] for factory in TABLES.values() if method in factory().specs
    )
    documented = _documented_fields(method)
    assert documented, f"docs/protocol.md lists no JSON field for {method}"
    stated = {k.removeprefix("payload.") for k in spec.bounds if k.startswith("payload.")}
    values = {v for b in spec.bounds.values() for v in b.values}
    assert documented - stated - values == set()


def test_the_inventory_bounds_are_the_directorys() -> None:
    """The register/report field bounds are what the master's directory enforces: a key
    one byte too long, and a version one past the bound, are refused."""
    from dsml.master.directory import _entry_problem

    sha = "0" * 64
    assert _entry_problem("k", 1, sha, 1) is None
    assert _entry_problem("k" * (limits.MAX_KEY + 1), 1, sha, 1) is not None
    top = FIELD_BOUNDS["register"]["payload.version"].limit
    assert top is not None
    assert _entry_problem("k", 1, sha, top) is None
    assert _entry_problem("k", 1, sha, top + 1) is not None
