"""The repo's datasets (MVTec AD, LMDB caches, SD-1.5 aligned data).

This top-level package shares its name with Hugging Face ``datasets`` (fixed by the project layout), so for
any script started from the repo root ``import datasets`` finds this package. The repo never needs HF
``datasets``; accelerate only imports it when its distribution metadata exists (it does not in our
install). Should a library still reach for an HF ``datasets`` attribute here, it gets an error that says
what happened instead of a baffling ``AttributeError``. See tests/foundation/test_root_imports.py.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"'datasets.{name}' was looked up on the repo's own datasets/ package, which shadows Hugging Face "
        f"`datasets` for scripts run from the repo root. Import submodules of this package explicitly "
        f"(e.g. `from datasets.mvtec import ...`); HF `datasets` is not used by this repo."
    )
