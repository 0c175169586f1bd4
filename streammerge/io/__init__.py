"""Bytes in and out: headers and O_DIRECT reads of local models, ranged reads of remote ones,
input references resolved, the shard writer, file fingerprints, paths and JSON within limits.
The bottom layer: imports nothing from the other subpackages.
"""
