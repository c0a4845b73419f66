"""onepoch: fast self-supervised learning of image representations (EMP-SSL and baselines).

The Python API (:mod:`onepoch.api`, imported on first use): ``onepoch.train(recipe, **overrides)``,
``onepoch.evaluate(run_dir)``, ``onepoch.load_backbone(path)``, ``onepoch.embed(model, images)``,
``onepoch.embed_folder(run, folder, out=...)``,
``onepoch.recipes()``.
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"
_API = ("Embedding", "RunResult", "embed", "embed_folder", "evaluate", "load_backbone", "recipes")
__all__ = [*_API, "train", "__version__"]


class _TrainerModule(_types.ModuleType):
    """The trainer module ``onepoch.train``; called, it runs :func:`onepoch.api.train`. So the name is
    both the module (``from onepoch.train import train``) and the API function (``onepoch.train(recipe)``)."""

    def __call__(self, recipe, **kwargs):
        from onepoch.api import train

        return train(recipe, **kwargs)


class _Package(_types.ModuleType):
    """The ``onepoch`` package: the API names are imported when first used (``import onepoch`` stays light,
    without torch), and the submodule ``onepoch.train`` becomes callable whenever it is imported."""

    def __setattr__(self, name, value):
        if name == "train" and type(value) is _types.ModuleType:  # the import system binding the submodule
            value.__class__ = _TrainerModule
        super().__setattr__(name, value)

    def __getattr__(self, name):
        if name == "train":
            import onepoch.train  # binds (and so patches) the submodule

            return self.__dict__["train"]
        if name in _API:
            from onepoch import api

            return getattr(api, name)
        raise AttributeError(f"module 'onepoch' has no attribute {name!r}")


_sys.modules[__name__].__class__ = _Package
