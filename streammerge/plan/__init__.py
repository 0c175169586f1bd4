"""Headers and a recipe into a plan: which tensors are merged or copied, shards, chunks, and
the API's argument checks. Imports ``recipe`` and ``io``.
"""
