"""Runtime library shared by every FedKeeper function.

It is bundled into each function's source zip next to the function's own
module, so it must only depend on what the function runtimes have (numpy,
pymongo, and tensorflow/scikit-learn for the training functions). The keeper
imports it too, so that tokens and blob encoding exist exactly once.
"""
