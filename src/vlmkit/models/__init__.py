"""vlmkit models: the language model, vision towers, projectors, and the models that take images.

Every model that takes images is an ImageModel (models/image_model.py); its image scheme lives in
vlmkit.schemes. Loading and saving checkpoints is vlmkit.weights (from_pretrained, save_pretrained).
"""
