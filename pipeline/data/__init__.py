"""Data: sources that load images and labels, augmentation builders, and the Lightning DataModule.

Data never imports models: it receives the model's input spec (size, mean, std, channels) as values.
"""
