"""csrc/weight_index.h, the C++ statement of the weight order, matches the Python one.

Every C++/CUDA file indexes the 14 parameters through ``casa::WeightIndex``; the Python
side through the fields of ``ScoreAttentionWeights``. The header is parsed here, so the
check needs no compiler and no built extension.
"""

import os
import re

from casa_kernels.weights import ScoreAttentionWeights, weight_shapes

HEADER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "weight_index.h"
)


def _header() -> str:
    with open(HEADER) as f:
        return re.sub(r"//[^\n]*", "", f.read())  # comments may name fields too


def _enum_members(source: str) -> list[str]:
    body = re.search(r"enum\s+WeightIndex\s*:\s*int\s*\{(.*?)\}", source, re.S).group(1)
    return [m.strip() for m in body.split(",") if m.strip()]


def _snake(member: str) -> str:
    """``kEnc0Weight`` -> ``enc0_weight``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", member.removeprefix("k")).lower()


def test_enum_order_is_the_python_field_order():
    members = _enum_members(_header())
    assert members[-1] == "kNumWeights"
    assert [_snake(m) for m in members[:-1]] == list(ScoreAttentionWeights._fields)


def test_weight_names_are_the_python_fields_in_order():
    body = re.search(r"kWeightNames\[kNumWeights\]\s*=\s*\{(.*?)\};", _header(), re.S).group(1)
    assert re.findall(r'"(\w+)"', body) == list(ScoreAttentionWeights._fields)


def test_weight_shapes_follow_the_field_order():
    assert list(weight_shapes(7, 16, 3)) == list(ScoreAttentionWeights._fields)
