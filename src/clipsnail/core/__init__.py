"""The bottom layer: errors, configs, atomic file writes, run directories, the process group, the names of pretrained
weights, model summaries. It imports nothing else of clipsnail."""
