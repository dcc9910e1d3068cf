"""mfrecipes: one-step generative models with MeanFlow, as composable YAML recipes.

``import mfrecipes`` stays cheap: torch and the component packages load on first use.

Python API::

    model = mfrecipes.load_pretrained("exported/")       # or a run directory
    x, y = mfrecipes.generate(model, 16, nfe=1, seed=0)
"""
__version__ = "0.1.0"

__all__ = ["load_pretrained", "generate", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `import mfrecipes` does not import torch.
    if name == "load_pretrained":
        from mfrecipes.export import load_pretrained

        return load_pretrained
    if name == "generate":
        import importlib

        return importlib.import_module("mfrecipes.generate")  # a callable module
    raise AttributeError(f"module 'mfrecipes' has no attribute {name!r}")
