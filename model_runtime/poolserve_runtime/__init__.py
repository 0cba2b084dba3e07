"""Shared runtime for the Triton Python-backend models in ``model_repository/``.

Triton treats every folder of a model repository as a model, so the code that all models share
lives here, outside the repository; each ``model.py`` only names its architecture family.
"""
