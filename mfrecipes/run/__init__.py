"""The run directory, in one place.

``layout`` names every record a run writes and finds weights in it (checkpoints, EMA groups);
it imports nothing above it, so the recipe builder, the trainer, the CLI and ``evaluate/`` can
all use it. ``records`` writes and reads the records (resolved recipe, environment, history,
lock), decides what may differ on resume, and redacts credentials.

Nothing is imported here: ``mfrecipes.run.layout`` stays importable from ``recipe/`` without
pulling in ``records`` (which builds on the recipe loader).
"""
