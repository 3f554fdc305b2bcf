"""A check that a result's keys are those its TypedDict documents (jaxl2.mnist.results)."""


def assert_typed(d, typed):
    """Every key of ``d`` is declared by ``typed`` and every required key is present."""
    declared = typed.__required_keys__ | typed.__optional_keys__
    assert set(d) <= declared, f"keys {sorted(set(d) - declared)} are not documented in {typed.__name__}"
    assert typed.__required_keys__ <= set(d), (
        f"{typed.__name__} keys missing: {typed.__required_keys__ - set(d)}"
    )
