"""`clipsnail.index`, the image index's public name (it lives in clipsnail.inference.index): a library of an image
folder's embeddings and facts, its search, and its update at the cost of what changed."""

from clipsnail.inference.index import Hit, ImageIndex, build_index, folder_index, is_index_dir, update_index

__all__ = ["Hit", "ImageIndex", "build_index", "folder_index", "is_index_dir", "update_index"]
