"""Every public name of fastattn has its entry in the API reference
(docs/api/index.rst, built from the docstrings by Sphinx in CI)."""
import pathlib

import fastattn

INDEX = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api" / "index.rst"


def test_every_public_name_is_in_the_api_reference():
    text = INDEX.read_text()
    missing = [name for name in fastattn.__all__
               if name != "__version__" and f"fastattn.{name}" not in text]
    assert not missing, f"add to docs/api/index.rst: {missing}"
