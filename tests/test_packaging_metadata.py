"""issue 19 item 12: installing prints no setuptools ``project.license`` deprecation banner.

setuptools >= 77 deprecates the ``license = { text = ... }`` table (PEP 639) and warns at
every build; an SPDX expression string needs setuptools >= 77 in the build requirements.
"""

from __future__ import annotations

import re

import tomllib

from tests.onnx_tools.helpers import ROOT


def test_license_is_an_spdx_expression_and_the_build_can_read_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    requires = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert len(requires) == 1
    version = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requires[0].replace(" ", ""))
    assert version and int(version.group(1)) >= 77, requires
