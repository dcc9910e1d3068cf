"""mfrecipes: one-step generative models with MeanFlow, as composable YAML recipes.

``import mfrecipes`` stays cheap: torch and the component packages load on first use.
"""
__version__ = "0.1.0"
