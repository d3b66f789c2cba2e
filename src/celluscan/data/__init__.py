"""celluscan.data: from image folders to training-ready data.

Modules (import the one you need; nothing heavy is imported here):

- ``imageio``: the one safe image loader (``load_image``) every entry point uses.
- ``scan``, ``dedup``, ``split``, ``stats``, ``report``, ``ingest``, ``cli``: the
  ``celluscan ingest`` pipeline (labels, sha256 + pHash de-duplication, grouped stratified
  splits, train-only channel statistics, reports).
- ``manifest`` (CSV rows, no torch) and ``datasets`` (torch Datasets over a manifest).
- ``transforms``: pad-to-square preprocessing, eval/train transforms.
- ``balance``: on-the-fly class balancing of the training split.
- ``atomic``, ``progress``: atomic file writes and progress reporting helpers.
"""
