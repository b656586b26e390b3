"""Merge: the mergekit method ``m2n2`` and the child that lives in one resident model.

Everything here is about two parents and one child: the split-point SLERP kernel, where a
tensor sits in the model (its layout), reading checkpoints, the mergekit method, and merging
straight into a resident model's tensors. Nothing here knows about a search or a report.
"""
