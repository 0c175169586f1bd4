"""Arguments into one recipe: the method table, the ``Recipe``, mergekit YAML, output dtypes,
the command's parsers (and docs/options.md generated from them). Imports only ``io``.
"""
