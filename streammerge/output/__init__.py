"""The output directory: staging, lock, journal, resume, finalize, side files and the model
card. Imports ``plan``, ``recipe`` and ``io``.
"""
