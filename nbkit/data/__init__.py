"""The training pictures (any mode, EXIF, bad files named) and class images for prior preservation (made by the
model itself, cached, or your own).

Modules: buckets (aspect-ratio bucketing), class_images, images. Import them by name (`from nbkit.data import
class_images`); this file imports nothing, so importing one module never loads the others.
"""
