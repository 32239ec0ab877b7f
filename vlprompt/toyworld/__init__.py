"""A toy world where base-to-new generalisation is real (no download needed).

world     attributes, scenes, captions, compositional class sets and the datasets' domains
render    scenes to 32x32 images
pretrain  contrastive pretraining of the shipped small CLIP (toy_clip.pt)
evaluate  zero-shot CLIP and HiCroPL on base and new classes with the framework-free API
broken    deliberately broken HiCroPL variants (the learning-quality checks must catch some)
The CoOp-format datasets are written by `python -m datasets.toy_world ROOT`.
"""
