import os

# Tests must not write into the user's cache (compiled programs, parsed mnist5k): the
# checkout's own .jax_cache/ serves every session.
os.environ.setdefault("JAXL2_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
