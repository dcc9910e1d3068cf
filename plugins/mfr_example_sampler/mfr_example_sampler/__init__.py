"""Example mfrecipes plugin package (the components live in ``sampler``)."""
