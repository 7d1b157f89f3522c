"""The classical methods each chapter measures its models against: denoising filters, threshold and
atlas segmentation, affine registration. No learned weights; each is seeded or deterministic.
"""
