"""`clipsnail.index`, the image index's public name (it lives in clipsnail.inference.index): a saved faiss index of
an image folder, its search, and its incremental update."""

from clipsnail.inference.index import Hit, ImageIndex, build_index, folder_index, is_index_dir, update_index

__all__ = ["Hit", "ImageIndex", "build_index", "folder_index", "is_index_dir", "update_index"]
