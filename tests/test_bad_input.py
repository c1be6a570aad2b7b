"""Every kind of bad input raises TumorsegInputError: one line, naming the file and the rule."""

from __future__ import annotations

import pytest
from conftest import BAD_EXPECT, BAD_KINDS, make_bad_dataset

from tumorseg.datasets import find_cases, load_case
from tumorseg.errors import TumorsegInputError


def _load_all(root):
    for case in find_cases(root):
        load_case(case)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises_one_line_naming_file_and_rule(tmp_path, kind):
    root = make_bad_dataset(tmp_path, kind)
    name, rule = BAD_EXPECT[kind]
    with pytest.raises(TumorsegInputError) as info:
        _load_all(root)
    message = str(info.value)
    assert "\n" not in message
    assert name in message, message
    assert rule in message, message


def _kinds_with_a_branch() -> set[str]:
    """The kinds make_bad_dataset builds, read from its source: every string that `kind` is
    compared with (`kind == "nan"`, `kind in ("nan", "inf")`)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(make_bad_dataset))
    kinds = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) \
                and node.left.id == "kind":
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.Eq, ast.In)):
                    kinds |= {c.value for c in ast.walk(right)
                              if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return kinds


def test_every_bad_kind_has_an_expectation():
    """Each branch of make_bad_dataset is a kind the tests run (BAD_KINDS) with an expectation,
    and each expectation has a branch (else its "bad" dataset would be a good one)."""
    assert _kinds_with_a_branch() == set(BAD_EXPECT) == set(BAD_KINDS)
    with pytest.raises(ValueError, match="unknown bad-dataset kind"):
        make_bad_dataset(None, "nope")


def test_duplicate_modality_names_both_files(tmp_path):
    root = make_bad_dataset(tmp_path, "duplicate_modality")
    with pytest.raises(TumorsegInputError) as info:
        find_cases(root)
    assert "bad_001_t1.nii.gz" in str(info.value) and "bad_001_t1.nii," in str(info.value)


def test_mismatch_names_both_files(tmp_path):
    for kind in ("shape_mismatch", "affine_mismatch"):
        (case,) = find_cases(make_bad_dataset(tmp_path, kind))
        with pytest.raises(TumorsegInputError) as info:
            load_case(case)
        assert "bad_001_t2.nii.gz" in str(info.value) and "bad_001_t1.nii.gz" in str(info.value)


def test_errors_list_collects_bad_cases_and_keeps_good_ones(tmp_path):
    from tumorseg.phantom import make_phantom, write_phantom

    root = make_bad_dataset(tmp_path, "missing_modality")
    write_phantom(make_phantom((32, 32, 24), seed=2), root, "brats2017", case_id="good_001")
    errors: list = []
    cases = find_cases(root, errors=errors)
    assert [c.case_id for c in cases] == ["good_001"]
    assert len(errors) == 1
    case_id, err = errors[0]
    assert case_id == "bad_001" and isinstance(err, TumorsegInputError)
    assert "missing modality t1c" in str(err)
