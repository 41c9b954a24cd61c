"""Every name the package exports resolves (they are imported lazily, so a stale entry would only fail on use)."""

import knnmoe_eval


def test_every_exported_name_resolves():
    for name in knnmoe_eval.__all__:
        assert getattr(knnmoe_eval, name) is not None, name
