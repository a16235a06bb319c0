"""The keeper's side of privacy (docs/privacy.md):

  settings.py       training.privacy and training.secure_aggregation: the
                    config blocks, what they refuse, the session spec
  accountant.py     epsilon per round with Google's dp-accounting, the
                    target-epsilon check
  secagg_stages.py  secure aggregation's stages as rounds of invocations

The mechanisms themselves (clipping, noise, masking) run inside the
functions: flcommon.privacy and flcommon.secagg. Nothing is imported here:
dp-accounting (and scipy under it) loads only where epsilon is computed.
"""
