"""Example mfrecipes plugin package (the objective lives in ``objective``)."""
