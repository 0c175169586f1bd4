"""Running a plan: the read / compute / write stages, kernel arguments, thresholds, the CPU
and device backends and the device queue. Imports ``output``, ``plan``, ``recipe`` and ``io``.
"""
