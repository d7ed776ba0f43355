"""tests/mutation.py stays in step with the kernels: a mutant whose text is no longer in the
source would never run, and the script would report nothing to kill."""

from pathlib import Path

import pytest

from tests import mutation

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutant", mutation.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_to_the_current_source(mutant):
    source = (ROOT / mutant.path).read_text()
    for original, mutated in mutant.replacements():
        assert source.count(original) == 1, (
            f"{mutant.name}: {original!r} is not in {mutant.path} once"
        )
        assert original != mutated
    for test in mutant.tests:
        assert (ROOT / test).is_file(), f"{mutant.name}: no test file {test}"
