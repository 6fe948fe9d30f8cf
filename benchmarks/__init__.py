"""The telemetrydeck-async benchmark suite (issue 7): ``python -m benchmarks [--quick]``.

Every figure is printed beside a baseline measured in the same run (a hand-written batched
aiohttp integration, or the plain-file equivalent), as a ratio, because absolute times drift on
shared machines. The suite reports; it never asserts a target.
"""
