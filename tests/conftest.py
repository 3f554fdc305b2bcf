import os

# Tests must not write into the user's cache; each session gets its own compilation cache.
os.environ.setdefault("JAXL2_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
