"""Merges as jobs: ``streammerge sweep`` (K draws from one read) and ``--ray`` (shards as
Ray tasks). Built on ``streammerge.api``; imports every layer below it.
"""
